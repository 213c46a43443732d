"""Selection: how the step size, other declared settings and the stopping point of a run are chosen.

Every method declares its candidates in the registry (`Method.candidates`: a log grid of step sizes,
and for some a weight decay or a loss constant). Each combination is one trial; a cell's trials train
as one stack (one gather of each batch, one backward), and each is scored at every checkpoint of its
run (a tenth of its steps apart). The protocols (`--select`):

- `hold` (default): scored by accuracy on the ground truth of the hold rows, the labelled rows that
  trained the weak model, which a practitioner has anyway. The best (trial, checkpoint) is the result as
  trained on all of train, ties to the earlier step, then to the earlier trial.
- `weak`: label-free, as EleutherAI's w2s early stopping: the trials train on train less a seeded 10%
  and are scored by agreement with that slice's weak labels (the ceilings: with its ground truth); the
  chosen trial then trains on all of train, stopped at the chosen checkpoint.
- `none`: the registry's fixed values, trained to the end.

`test` is never read before the choice: a trial's score reads the hold rows (or the slice) only, and
the test rows are evaluated afterwards, from the chosen trial's saved checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cpl_cache.train.methods import DEFAULT_PROTOCOL, PROTOCOLS, Method

if TYPE_CHECKING:
    from cpl_cache.train.trainer import Cell, DomainTensors

__all__ = ["PROTOCOLS", "DEFAULT_PROTOCOL", "SELECT_HOLDOUT", "trials", "HoldScore", "SliceView", "choose"]

SELECT_HOLDOUT = 0.1  # the share of train rows `--select weak` holds out to score on


def trials(cell: Cell) -> list[tuple[dict[str, Any], Cell]]:
    """Each candidate of a cell (its values, and the cell with them filled in), in the registry's order:
    the product of its candidate lists, the first key varying slowest. A cell without candidates is its
    own single trial."""
    grid = cell.hparams.get("candidates") or {}
    if not grid:
        return [({}, cell)]
    out = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo, strict=True))
        hp = {**cell.hparams, "loss_args": dict(cell.hparams["loss_args"])}
        for key, value in values.items():
            if key in hp["loss_args"]:
                hp["loss_args"][key] = value
            else:
                hp[key] = value
        hp.pop("candidates")
        label = ",".join(f"{k}={v:g}" for k, v in values.items())
        out.append((values, dataclasses.replace(cell, hparams=hp, name=f"{cell.name}@{label}")))
    return out


@torch.no_grad()
def _correct(head: nn.Module, x: Tensor, reference: Tensor, bf16: bool = False) -> int:
    from cpl_cache.train.trainer import predict

    return int((predict(head, x, bf16) == reference).sum())


class HoldScore:
    """`--select hold`: the number of hold rows a head classifies right (their ground truth)."""

    protocol = "hold"

    def __init__(self, dt: DomainTensors) -> None:
        self.x, self.y = dt.x_hold, dt.y_hold
        self.rows = len(self.y)
        self.what = f"accuracy on the {self.rows} hold rows' ground truth"

    def __call__(self, head: nn.Module, method: Method, bf16: bool = False) -> int:
        return _correct(head, self.x, self.y, bf16)


class SliceView:
    """`--select weak`: a domain's train rows less a seeded slice, standing in for `DomainTensors` while
    trials train; a head is scored by agreement with the slice's weak labels (the ceilings: with its
    ground truth). Neither `hold` nor `test` is read."""

    protocol = "weak"

    def __init__(self, dt: DomainTensors, seed: int) -> None:
        n = len(dt.train)  # at least 2: train_cells refuses fewer before any training
        k = max(1, round(SELECT_HOLDOUT * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self._dt, self._val, self._fit = dt, perm[:k].to(dt.device), perm[k:].to(dt.device)
        self.data, self.device, self.where, self.precision = dt.data, dt.device, dt.where, dt.precision
        self.train = dt.train[perm[k:]]
        self.x_train, self.weak_train = dt.x_train[self._fit], dt.weak_train[self._fit]
        self.x_val, self.weak_val = dt.x_train[self._val], dt.weak_train[self._val].argmax(dim=1)
        self.rows = k
        self.what = f"agreement with the weak labels of {k} train rows held out ({SELECT_HOLDOUT:.0%})"

    @cached_property
    def truth_train(self) -> Tensor:
        return self._dt.truth_train[self._fit]

    @cached_property
    def y_val(self) -> Tensor:  # read at every checkpoint of a ceiling's trials: made once
        return self._dt.truth_train[self._val].argmax(dim=1)

    def targets(self, method: Method) -> Tensor:
        return self.truth_train if method.uses_ground_truth else self.weak_train

    def __call__(self, head: nn.Module, method: Method, bf16: bool = False) -> int:
        return _correct(head, self.x_val, self.y_val if method.uses_ground_truth else self.weak_val, bf16)


def choose(scores: Sequence[Sequence[int] | None], finite: Sequence[bool]) -> tuple[int, int]:
    """The best (trial, checkpoint) by score, over checkpoints after the first step (index >= 1) of
    trials whose losses stayed finite (all trials if none did); ties to the earlier checkpoint, then to
    the earlier trial."""
    ok = [t for t, f in enumerate(finite) if f] or list(range(len(finite)))
    best: tuple[int, int] | None = None
    for k in range(1, max(len(s or ()) for s in scores)):
        for t in ok:
            s = scores[t]
            if s is not None and k < len(s) and (best is None or s[k] > scores[best[0]][best[1]]):
                best = (t, k)
    if best is None:
        raise ValueError("no checkpoint after the first step was scored")
    return best


def selection_record(
    protocol: str,
    what: str,
    candidates: Sequence[dict[str, Any]],
    steps: Sequence[int],
    scores: Sequence[Sequence[int]],
    rows: int,
    chosen: tuple[int, int],
    halving: Sequence[float] | None = None,
    stopped: Sequence[int | None] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What a result records of its selection: the protocol, the halving schedule, each candidate's score
    (a fraction of the scored rows) at every checkpoint it reached and the step at which halving stopped
    it (if it did), and the chosen point."""
    t, k = chosen
    stopped = list(stopped) if stopped is not None else [None] * len(candidates)
    return {
        "protocol": protocol,
        "score": what,
        "halving": list(halving or []),
        "candidates": [
            {
                **values,
                "scores": {str(s): v / rows for s, v in zip(steps[1:], sc[1:], strict=False)},
                **({"stopped": at} if at is not None else {}),
            }
            for values, sc, at in zip(candidates, scores, stopped, strict=True)
        ],
        "chosen": {**candidates[t], "step": steps[k], "score": scores[t][k] / rows},
        **extra,
    }


# Successive halving: at the checkpoints nearest each fraction of a run in a method's `halving`
# schedule, the trials of a cell that are clearly behind stop training, so that the later, larger part of
# the run is paid for by the few trials that can still be chosen. A stopped trial keeps the checkpoints it
# reached: `choose` still sees them. A survivor trains exactly as it would have in the full search (its
# parameters take gradients from its own loss only), so halving changes a choice only when a stopped
# trial would have overtaken the leader later.
HALVING_KEEP = 1 / 3  # at each point, at least this share of a cell's running trials go on (rounded up)
HALVING_CLEAR = 1.0  # "clearly behind": this many standard errors of a score difference below the leader


def halving_points(schedule: Sequence[float], steps: Sequence[int]) -> set[int]:
    """The checkpoint indices (into `steps`, step 0 first) at which a run with this schedule halves."""
    if not schedule or len(steps) < 3:
        return set()
    total = steps[-1]
    return {min(range(1, len(steps) - 1), key=lambda k: (abs(steps[k] - f * total), k)) for f in schedule}


def go_on(scores: Sequence[Sequence[int]], running: Sequence[bool], rows: int) -> list[bool]:
    """Which of a cell's trials keep training at a halving point, from their scores so far (counts of
    `rows` scored right, step 0 first). A running trial stops when it lies outside the best
    ceil(HALVING_KEEP x running) by its best score after step 0 and that score is below the leader's by
    more than HALVING_CLEAR standard errors of a difference of two accuracies on `rows` rows (so on a
    small hold set, where scores are noisy, trials are rarely stopped). Ties keep the earlier trial."""
    live = [t for t, r in enumerate(running) if r]
    if len(live) < 2 or rows <= 0:
        return list(running)
    best = {t: max(scores[t][1:], default=scores[t][0]) for t in live}
    ranked = sorted(live, key=lambda t: (-best[t], t))
    keep = set(ranked[: math.ceil(HALVING_KEEP * len(live))])
    p = min(max(best[ranked[0]] / rows, 1 / rows), 1 - 1 / rows)
    margin = HALVING_CLEAR * math.sqrt(2 * p * (1 - p) / rows) * rows
    return [r and (t in keep or best[ranked[0]] - best[t] <= margin) for t, r in enumerate(running)]


def simulate_halving(
    schedule: Sequence[float], steps: Sequence[int], scores: Sequence[Sequence[int]], rows: int
) -> list[list[int]]:
    """The scores each trial of a full search would have reached under `schedule` (a prefix of its
    own): what the regret benchmark compares against the full search, from the same runs."""
    points = halving_points(schedule, steps)
    running = [True] * len(scores)
    cut = [len(s) for s in scores]
    for k in sorted(points):
        now = go_on([s[: k + 1] for s in scores], running, rows)
        for t, (was, still) in enumerate(zip(running, now, strict=True)):
            if was and not still:
                cut[t] = k + 1
        running = now
    return [list(s[:c]) for s, c in zip(scores, cut, strict=True)]
