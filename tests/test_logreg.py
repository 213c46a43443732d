"""The L-BFGS logistic-regression probe: its fits are optima of the stated objective (checked by autograd
and, for two classes, against Newton's method in numpy), and its choice of lam reads the hold labels only,
ties going to the stronger regularisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpl_cache.train import logreg
from cpl_cache.train.logreg import LogRegResult, fit_logreg, logreg_probe


def planted(n: int, d: int, k: int, scale: float = 6.0, seed: int = 0, dtype=torch.float64):
    """Unit rows with a shared component (as CLIP embeddings have), labels from a noisy linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(k, d, generator=g, dtype=torch.float64)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64) + 0.4, dim=1)
    gumbel = -torch.log(-torch.log(torch.rand(n, k, generator=g, dtype=torch.float64)))
    y = (scale * x @ teacher.T + gumbel).argmax(dim=1)
    return x.to(dtype), y


def objective_grad(x: torch.Tensor, y: torch.Tensor, lam: float, weight: torch.Tensor, bias: torch.Tensor):
    """Max-abs gradient of mean CE + (lam/2)||W||^2 at (weight, bias), by autograd in float64."""
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_()
    loss = F.cross_entropy(x.double() @ w.T + b, y) + 0.5 * lam * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    return max(gw.abs().max().item(), gb.abs().max().item())


@pytest.mark.parametrize("lam", [1e-1, 1e-4])
def test_fit_is_a_stationary_point_of_the_objective(lam):
    x, y = planted(400, 12, 5)
    weight, bias = fit_logreg(x, y, 5, lam)
    assert weight.shape == (5, 12) and bias.shape == (5,) and weight.dtype == torch.float64
    # The solver stops at max|grad| <= 1e-7 (centred coordinates); mapped back it stays within 2x that.
    assert objective_grad(x, y, lam, weight, bias) < 1e-6
    assert abs(bias.sum().item()) < 1e-12  # the free common shift of the bias is fixed at zero


def test_float32_fit_is_near_the_float64_optimum():
    x, y = planted(400, 12, 5)
    w32, b32 = fit_logreg(x.float(), y, 5, 1e-3, tol=1e-5)
    assert w32.dtype == torch.float32
    assert objective_grad(x, y, 1e-3, w32, b32) < 5e-5
    w64, b64 = fit_logreg(x, y, 5, 1e-3)
    torch.testing.assert_close(w32.double(), w64, atol=5e-3, rtol=0)
    torch.testing.assert_close(b32.double(), b64, atol=5e-3, rtol=0)


def newton_binary(x: np.ndarray, t: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Minimise mean log-loss(v.x + c, t) + (lam/2)||v||^2 (c free) by Newton's method, float64."""
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    reg = np.full(d + 1, lam)
    reg[-1] = 0.0
    theta = np.zeros(d + 1)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (p - t) / n + reg * theta
        hess = (a * (p * (1 - p))[:, None]).T @ a / n + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-14:
            break
    return theta[:-1], float(theta[-1])


@pytest.mark.parametrize("lam", [1e-1, 1e-3])
def test_two_classes_match_binary_logistic_regression_by_newton(lam):
    # Two classes: the CE sees only v = w1 - w0 and c = b1 - b0. Its gradient rows sum to zero, so at the
    # optimum lam (w0 + w1) = 0, i.e. w1 = -w0 = v/2 and (lam/2)(|w0|^2 + |w1|^2) = (lam/4)|v|^2: the
    # binary problem with penalty (lam_bin/2)|v|^2 where lam_bin = lam / 2.
    x, y = planted(300, 6, 2, scale=3.0, seed=1)
    weight, bias = fit_logreg(x, y, 2, lam, tol=1e-10)
    v, c = newton_binary(x.numpy(), y.numpy().astype(np.float64), lam / 2)
    np.testing.assert_allclose((weight[1] - weight[0]).numpy(), v, atol=1e-7, rtol=1e-6)
    assert (bias[1] - bias[0]).item() == pytest.approx(c, abs=1e-7)
    torch.testing.assert_close(weight[0], -weight[1], atol=1e-9, rtol=0)
    # With lam not halved the binary answer is a different one (the scaling matters).
    v_wrong, _ = newton_binary(x.numpy(), y.numpy().astype(np.float64), lam)
    assert np.abs(v_wrong - v).max() > 1e-3


def test_warm_start_from_the_solution_stops_at_once(monkeypatch):
    x, y = planted(300, 8, 4)
    x = x + 0.3  # a large mean: the init must be mapped to centred coordinates exactly
    solution = fit_logreg(x, y, 4, 1e-3, tol=1e-10)
    evals = []
    step = torch.optim.LBFGS.step

    def counting(self, closure):
        return step(self, lambda: evals.append(1) or closure())

    monkeypatch.setattr(torch.optim.LBFGS, "step", counting)
    again = fit_logreg(x, y, 4, 1e-3, init=solution, tol=1e-8)
    assert len(evals) == 1
    torch.testing.assert_close(again[0], solution[0], atol=1e-12, rtol=0)


def test_separable_data_with_no_penalty_ends_within_max_iter(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(200, 5, generator=g), dim=1)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # four quadrant classes: linearly separable
    evals = []
    step = torch.optim.LBFGS.step

    def counting(self, closure):
        return step(self, lambda: evals.append(1) or closure())

    monkeypatch.setattr(torch.optim.LBFGS, "step", counting)
    for lam in (0.0, 1e-12):
        evals.clear()
        weight, bias = fit_logreg(x, y, 4, lam, max_iter=40)
        assert 0 < len(evals) <= 50  # 1.25 * max_iter evaluations at most
        assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
        assert ((x @ weight.T + bias).argmax(dim=1) == y).all()


def test_a_class_without_training_rows_gets_minus_inf_and_the_rest_is_the_smaller_fit():
    x, y = planted(300, 8, 4, seed=2)
    keep = y != 2
    x, y = x[keep], y[keep]
    weight, bias = fit_logreg(x, y, 4, 1e-2)
    assert bias[2].item() == float("-inf") and (weight[2] == 0).all()
    small_w, small_b = fit_logreg(x, torch.where(y == 3, 2, y), 3, 1e-2)  # classes 0, 1, 3 as 0, 1, 2
    torch.testing.assert_close(weight[[0, 1, 3]], small_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[[0, 1, 3]], small_b, atol=1e-6, rtol=0)


def test_fit_rejects_bad_input():
    x, y = planted(20, 4, 3)
    with pytest.raises(ValueError, match="lam"):
        fit_logreg(x, y, 3, -1.0)
    with pytest.raises(ValueError, match="labels"):
        fit_logreg(x, y, 2, 1e-3)
    with pytest.raises(ValueError, match="init"):
        fit_logreg(x, y, 3, 1e-3, init=(torch.zeros(2, 4), torch.zeros(2)))


LAMS = (1e-1, 1e-2, 1e-3, 1e-4)


def split(seed: int = 0, dtype=torch.float32):
    x, y = planted(900, 10, 4, seed=seed, dtype=dtype)
    return x[:300], y[:300], x[300:600], y[300:600], x[600:], y[600:]


def accuracy(weight, bias, x, y) -> float:
    return ((x.to(weight.dtype) @ weight.T + bias).argmax(dim=1) == y).double().mean().item()


@pytest.fixture(scope="module")
def data():
    return split()


@pytest.fixture(scope="module")
def probed(data):
    return logreg_probe(*data, 4, LAMS)


def test_probe_picks_the_best_hold_accuracy_and_scores_that_model_on_test(data, probed):
    xtr, ytr, xh, yh, xte, yte = data
    r = probed
    assert isinstance(r, LogRegResult)
    assert set(r.scores) == set(LAMS)
    assert r.hold_acc == max(r.scores.values()) == r.scores[r.lam]
    assert r.hold_acc == pytest.approx(accuracy(r.weight, r.bias, xh, yh), abs=1e-12)
    assert r.test_acc == pytest.approx(accuracy(r.weight, r.bias, xte, yte), abs=1e-12)
    assert r.scores[1e-1] < r.hold_acc  # the grid matters on this data
    # The chosen model is the fit at that lam (warm starts change the start, not the optimum).
    weight, bias = fit_logreg(xtr, ytr, 4, r.lam, tol=1e-6)
    assert accuracy(weight, bias, xh, yh) == pytest.approx(r.hold_acc, abs=1 / 300)


def test_probe_reads_only_the_hold_labels_to_choose(data, probed):
    xtr, ytr, xh, yh, xte, yte = data
    base = probed
    g = torch.Generator().manual_seed(5)
    shuffled_test = logreg_probe(xtr, ytr, xh, yh, xte, yte[torch.randperm(len(yte), generator=g)], 4, LAMS)
    assert shuffled_test.lam == base.lam and shuffled_test.hold_acc == base.hold_acc
    assert shuffled_test.scores == base.scores
    torch.testing.assert_close(shuffled_test.weight, base.weight, atol=0, rtol=0)
    assert shuffled_test.test_acc < base.test_acc - 0.2  # test labels do reach the test score
    shuffled_hold = logreg_probe(xtr, ytr, xh, yh[torch.randperm(len(yh), generator=g)], xte, yte, 4, LAMS)
    assert shuffled_hold.scores != base.scores
    assert max(shuffled_hold.scores.values()) < base.hold_acc - 0.2


def test_probe_ties_go_to_the_stronger_regularisation_on_real_fits():
    # Well-separated classes: every lam classifies the hold rows perfectly, so all tie.
    g = torch.Generator().manual_seed(7)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.arange(300) % 3
    x = F.normalize(centres[y] + 0.05 * torch.randn(300, 8, generator=g), dim=1)
    for lams in ((1e-1, 1e-2, 1e-4), (1e-4, 1e-1, 1e-2)):
        r = logreg_probe(x[:100], y[:100], x[100:200], y[100:200], x[200:], y[200:], 3, lams)
        assert set(r.scores.values()) == {1.0}
        assert r.lam == 1e-1


def test_probe_ties_in_the_middle_of_the_grid_go_to_the_stronger(monkeypatch):
    # Stand-in fits whose hold accuracies over LAMS are 1/3, 1, 1, 1/3: the tie is between 1e-2 and 1e-3.
    xh = torch.eye(3)
    yh = torch.arange(3)
    good = {1e-2, 1e-3}
    seen = []

    def fake_fit(x, y, num_classes, lam, *, init=None, max_iter=500, tol=1e-7):
        seen.append(lam)
        weight = torch.eye(3) if lam in good else torch.zeros(3, 3)
        return weight, torch.zeros(3)

    monkeypatch.setattr(logreg, "fit_logreg", fake_fit)
    r = logreg_probe(xh, yh, xh, yh, xh, yh, 3, (1e-4, 1e-2, 1e-1, 1e-3))
    assert seen == sorted(seen, reverse=True)  # strong to weak
    assert r.scores == {1e-1: pytest.approx(1 / 3), 1e-2: 1.0, 1e-3: 1.0, 1e-4: pytest.approx(1 / 3)}
    assert r.lam == 1e-2 and r.hold_acc == 1.0 and r.test_acc == 1.0


def test_default_grid_is_a_log_grid_from_strong_to_weak():
    lams = np.array(logreg.DEFAULT_LAMS)
    assert len(lams) == 11 and lams[0] == pytest.approx(1e-1) and lams[-1] == pytest.approx(1e-6)
    np.testing.assert_allclose(np.diff(np.log10(lams)), -0.5)


def test_the_ceiling_lp_is_within_a_point_of_the_clip_papers_probe(tmp_path):
    """`ceiling-lp` under the default protocol (AdamW, step size, weight decay and stopping point chosen on
    hold) against multinomial logistic regression by L-BFGS with its L2 strength chosen on the same hold
    rows: the ceiling is a ceiling (within 1 point, on a 3,000-row 20-class zoo cache)."""
    from cpl_cache.cache import load_domain
    from cpl_cache.synth.zoo import write_zoo_cache
    from cpl_cache.train.logreg import logreg_probe
    from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig, train_cells

    name = "mixture-64x20"
    write_zoo_cache(tmp_path, name)
    dt = DomainTensors(load_domain(tmp_path, name), "cpu")
    (rec,) = train_cells([Cell.of(TrainConfig("ceiling-lp", name, tmp_path))], dt, tmp_path / "out")
    probe = logreg_probe(dt.x_train, dt.truth_train.argmax(dim=1), dt.x_hold, dt.y_hold, dt.x_test, dt.y_test,
                         dt.data.num_classes)  # fmt: skip
    assert len(dt.y_test) == 750 and rec["selection"]["protocol"] == "hold"
    assert abs(rec["metrics"]["test_acc"] - probe.test_acc) <= 0.01, (rec["metrics"], probe.test_acc)
