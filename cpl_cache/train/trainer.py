"""Stage two: train heads with their losses from the cached tensors, evaluate, write the results JSON.

    cpl-cache train --method cpl --domain quickdraw --cache-dir cache
    cpl-cache train --method naive-lp --domain quickdraw --cache-dir cache --loss adaptconf --set tau=4

    from cpl_cache.train.trainer import TrainConfig, run_training
    record = run_training(TrainConfig(method="cpl", domain="quickdraw", cache_dir=Path("cache")))

The whole split lives on the device as tensors: embeddings normalised once to float32, targets (weak
logits, or ground truth for the ceilings) gathered once. A batch is a slice of a seeded permutation;
there is no DataLoader and no per-step host sync.

Cells (method x seed) of one domain that share a head kind, a step count, a batch size and a seed train
as one stack: every head sees the same batch rows (one gather), each computes its own loss on the same
batch, one backward of their sum and one AdamW step update them all. A cell's parameters get gradients
from its own loss only, so a cell trained alone or in a stack takes the same steps: one seed's methods
are a paired comparison (same initialisation, same batch order), whatever else trains beside them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpl_cache.errors import UserError
from cpl_cache.runtime import check_seed
from cpl_cache.train.heads import PROMPT_INIT, TEXT_HEADS, get_head
from cpl_cache.train.losses import get_loss
from cpl_cache.train.methods import (
    DEFAULT_PROTOCOL,
    HPARAMS,
    MAX_STEPS,
    Method,
    get_method,
    resolve_hparams,
)
from cpl_cache.train.select import (
    HoldScore,
    SliceView,
    choose,
    go_on,
    halving_points,
    selection_record,
    trials,
)

if TYPE_CHECKING:
    from cpl_cache.cache import CachedDomain

TRUTH_OFF = -1e4  # ground truth as logits: 0 on the true class, this elsewhere; softmax reads it as one-hot
EVAL_CHUNK = 16384  # rows per forward pass when evaluating (bounds memory on large splits)
# Train accuracy (agreement with the weak argmax), in the curve and in `metrics`, is measured on this many
# fixed random train rows: an estimate within about half a point, at a tenth of a full pass on quickdraw.
CURVE_TRAIN_ROWS = 8192
COLLAPSE_SHARE = 0.9  # a run whose most predicted class takes more of the test rows than this is flagged
SELECT_HOLDOUT = 0.1  # the share of train rows `--select` holds out to score each step size on


@dataclass(frozen=True)
class TrainConfig:
    """One stage-two run: a method, a seed, and overrides of any of its hyperparameters (`HPARAMS` keys
    and the loss's constants), e.g. {"lr": 0.01, "tau": 4.0}."""

    method: str
    domain: str
    cache_dir: Path
    out: Path = Path("results")
    seed: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"
    select: str = DEFAULT_PROTOCOL  # hold, weak or none: how candidates are chosen (cpl_cache.train.select)
    precision: str = "auto"  # bf16, fp32 or auto (cpl_cache.runtime.resolve_precision)


@dataclass(frozen=True)
class Cell:
    """One run, resolved: the method, its hyperparameters as recorded, and its name.

    The name is the method's, followed by `+key=value` for each override that differs from the
    method's default (e.g. `cpl+loss=soft`, `adaptconf-lp+tau=4`), so that an ablation never
    overwrites the plain method's results."""

    method: Method
    seed: int
    hparams: dict[str, Any]
    name: str

    @classmethod
    def of(cls, cfg: TrainConfig) -> Cell:
        check_seed(cfg.seed, "seed")
        method = get_method(cfg.method)
        hparams, changed = resolve_hparams(method, dict(cfg.overrides), select=cfg.select)
        order = [*HPARAMS, *hparams.get("loss_args", {}), "select"]
        name = method.name + "".join(f"+{k}={_show(changed[k])}" for k in order if k in changed)
        return cls(method, cfg.seed, hparams, name)

    def steps(self, n: int) -> int:
        """Optimiser steps on n train rows: max(min_steps, epochs x steps per epoch)."""
        hp = self.hparams
        if not self.method.trains or n == 0:
            return 0
        return max(hp["min_steps"], hp["epochs"] * math.ceil(n / min(hp["batch_size"], n)))

    def loss_fn(self) -> Callable[[Tensor, Tensor, float], Tensor]:
        return partial(get_loss(self.hparams["loss"]), **self.hparams["loss_args"])


def _show(value: Any) -> str:
    """A setting as a run name shows it: 0.001 as 0.001, a list of candidates as 0.001,0.01."""
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def resolve(cfg: TrainConfig) -> Cell:
    """The checked cell of a config (raises UserError on a bad method, override or seed)."""
    return Cell.of(cfg)


def result_path(out: Path, domain: str, method: str, seed: int) -> Path:
    """Where a run's record lives: `out/domain/{method}-seed{seed}.json`."""
    return Path(out) / domain / f"{method}-seed{seed}.json"


def check_domain(data: CachedDomain, where: str) -> None:
    """Refuse a cache that no method can give a meaningful result on, with one line naming the fix."""
    counts = torch.bincount(data.split.long(), minlength=3)
    if int(counts[2]) == 0:
        raise UserError(
            f"{where} has no test rows, so there is nothing to evaluate on; "
            "extract it with a hold fraction below 1 (or use the full cache)"
        )
    bad = ~torch.isfinite(data.weak_logits).all(dim=1)
    if bool(bad.any()):
        rows = data.index[bad][:5].tolist()
        raise UserError(
            f"{where} has {int(bad.sum())} row(s) of NaN or infinite weak logits (image rows {rows}...); "
            "the weak checkpoint is broken: fix it and re-extract with --overwrite"
        )


class DomainTensors:
    """One domain's tensors on one device, made once and shared by every run on it. `precision` (auto,
    bf16 or fp32: `cpl_cache.runtime.resolve_precision`, for this domain's head size) is how the runs on
    it compute their matrix products; `self.precision` is what it resolved to."""

    def __init__(
        self, data: CachedDomain, device: str, where: str | None = None, precision: str = "fp32"
    ) -> None:
        from cpl_cache.runtime import resolve_precision

        self.data, self.device = data, device
        self.precision = resolve_precision(precision, device, data.dim * data.num_classes)
        self.where = where or f"the cache of {data.manifest.get('domain')}"
        check_domain(data, self.where)
        self.train, self.test, self.hold = data.rows("train"), data.rows("test"), data.rows("hold")
        self.y_test = data.labels[self.test].to(device)  # the only ground truth a weak-supervised run reads
        self.weak_test = data.weak_logits[self.test].argmax(dim=1).to(device)
        K = data.num_classes
        if bool((self.y_test < 0).any() or (self.y_test >= K).any()):
            raise UserError(
                f"test labels of {self.where} fall outside 0..{K - 1}; the cache is damaged, re-extract it"
            )

    def _embeds(self, rows: Tensor) -> Tensor:
        # Rows travel as float16 and are normalised once, on the device, in float32.
        return F.normalize(self.data.image_embeds.index_select(0, rows).to(self.device).float(), dim=1)

    @cached_property
    def x_train(self) -> Tensor:
        return self._embeds(self.train)

    @cached_property
    def x_test(self) -> Tensor:
        return self._embeds(self.test)

    @cached_property
    def x_hold(self) -> Tensor:
        return self._embeds(self.hold)

    @cached_property
    def y_hold(self) -> Tensor:
        """Ground truth of the hold rows: read by `--select hold` only, to score candidates."""
        return self._labels(self.hold, "hold")

    def _labels(self, rows: Tensor, split: str) -> Tensor:
        """Ground truth of `rows` on the device, refused in one line when outside 0..K-1."""
        y = self.data.labels[rows].to(self.device)
        K = self.data.num_classes
        if bool((y < 0).any() or (y >= K).any()):
            raise UserError(f"{split} labels of {self.where} fall outside 0..{K - 1}; re-extract the cache")
        return y

    @cached_property
    def weak_train(self) -> Tensor:
        return self.data.weak_logits.index_select(0, self.train).to(self.device)

    @cached_property
    def truth_train(self) -> Tensor:
        """Ground truth of the train rows as logits: 0 on the true class, TRUTH_OFF elsewhere."""
        y = self._labels(self.train, "train")
        return torch.full((len(y), self.data.num_classes), TRUTH_OFF, device=self.device).scatter_(
            1, y[:, None], 0.0
        )

    def targets(self, method: Method) -> Tensor:
        return self.truth_train if method.uses_ground_truth else self.weak_train


@torch.no_grad()
def predict(head: nn.Module, x: Tensor, bf16: bool = False) -> Tensor:
    """Argmax class of every row, a chunk at a time (matrix products in bfloat16 with `bf16`)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([head(x[i : i + EVAL_CHUNK]).argmax(dim=1) for i in range(0, len(x), EVAL_CHUNK)])


def cosine(total: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: half a cosine from 1 down to 0 over `total` steps."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total))


def fit(
    heads: Sequence[nn.Module],
    losses: Sequence[Callable[[Tensor, Tensor, float], Tensor]],
    targets: Sequence[Tensor],
    x: Tensor,
    groups: Sequence[Mapping[str, float]],
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    evaluate: Callable[[int], Sequence[bool] | None] | None = None,
    at: set[int] = frozenset(),
    bf16: bool = False,
) -> Tensor:
    """Train a stack of heads on rows `x` (N, D), head h with `losses[h]` against `targets[h]` (N, K):
    AdamW with `groups[h]`'s lr and weight_decay, cosine schedule to zero, `steps` steps of `batch_size`
    rows from one seeded permutation per pass. `evaluate(step)` runs at the steps in `at` and may return
    which heads go on training (successive halving): a stopped head takes no more steps, and the others
    take exactly the steps they would have taken beside it. With `bf16` the heads' matrix products run
    in bfloat16 under autocast (float32 accumulation); logits, losses, weights and AdamW stay float32.

    Returns, per head, whether every one of its losses was finite (read once, at the end)."""
    n = len(x)
    bs = min(batch_size, n)
    per_epoch = math.ceil(n / bs)
    params = [[p for p in h.parameters() if p.requires_grad] for h in heads]
    fused = x.device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW([{"params": p, **g} for p, g in zip(params, groups, strict=True)], fused=fused)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps))
    # Heads that train against the same targets share one gather of them per step.
    distinct = list({id(t): t for t in targets}.values())
    which = [next(i for i, t in enumerate(distinct) if t is target) for target in targets]
    finite = torch.ones(len(heads), dtype=torch.bool, device=x.device)
    live = list(range(len(heads)))
    live_index = torch.arange(len(heads), device=x.device)
    for step in range(steps):
        if evaluate is not None and step in at:
            running = evaluate(step)
            if running is not None and sum(running) < len(live):
                live = [h for h in live if running[h]]
                live_index = torch.tensor(live, device=x.device)
        i = step % per_epoch
        if i == 0:  # a fresh order per pass, drawn on the CPU so every device sees the same one
            perm = torch.randperm(n, generator=generator).to(x.device)
        idx = perm[i * bs : (i + 1) * bs]
        xb = x.index_select(0, idx)
        tb = [t.index_select(0, idx) for t in distinct]
        progress = step / steps
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = [heads[h](xb) for h in live]
        logits = [s.float() if s.dtype == torch.bfloat16 else s for s in logits]  # losses in float32
        values = [losses[h](s, tb[which[h]], progress) for h, s in zip(live, logits, strict=True)]
        opt.zero_grad(set_to_none=True)  # a stopped head's gradients stay None: AdamW skips it
        torch.stack(values).sum().backward()
        opt.step()
        schedule.step()
        ok = torch.isfinite(torch.stack([v.detach() for v in values]))
        finite.index_copy_(0, live_index, finite.index_select(0, live_index) & ok)
    if evaluate is not None:
        evaluate(steps)
    return finite


def health(pred_test: Tensor, finite: bool, head: nn.Module | None, num_classes: int) -> list[str]:
    """What makes a run's numbers untrustworthy: a non-finite loss or parameter, or predictions collapsed
    onto one class. Empty for a healthy run."""
    flags = []
    if not finite:
        flags.append("non-finite loss")
    if head is not None and not all(bool(torch.isfinite(p).all()) for p in head.parameters()):
        flags.append("non-finite parameters")
    if len(pred_test) and num_classes > 2:
        share = torch.bincount(pred_test, minlength=num_classes).max().item() / len(pred_test)
        if share > COLLAPSE_SHARE:
            flags.append(f"collapsed: one class takes {100 * share:.0f}% of test predictions")
    return flags


@dataclass
class Trace:
    """One trained head: its parameters at each checkpoint (step 0 first) and, when it is a candidate,
    how many of the scoring rows it got right there."""

    trial: Cell
    head: nn.Module | None
    steps: list[int]
    snapshots: list[list[Tensor]]
    scores: list[int] | None
    finite: bool = True
    seconds: float = 0.0
    stopped: int | None = None  # the step at which successive halving stopped it (None: it ran out)

    def load(self, k: int) -> nn.Module:
        """The head with its parameters as at checkpoint k."""
        with torch.no_grad():
            for p, saved in zip(_trained(self.head), self.snapshots[k], strict=True):
                p.copy_(saved)
        return self.head


def _trained(head: nn.Module) -> list[nn.Parameter]:
    return [p for p in head.parameters() if p.requires_grad]


def checkpoints(cell: Cell, steps: int) -> list[int]:
    """The steps at which a run is scored and its curve drawn: step 0 and `curve_points` more, evenly."""
    points = cell.hparams["curve_points"]
    return sorted({round(i * steps / points) for i in range(points + 1)})


def train_stack(
    trials: Sequence[Cell],
    view: Any,
    steps: int,
    scorers: Sequence[Callable[..., int] | None],
    cells: Sequence[int] | None = None,
) -> list[Trace]:
    """Train trials (cells with every setting fixed) that share a head kind, a step count, a batch size
    and a seed as one stack on `view`'s train rows, saving each head's parameters at every checkpoint
    and scoring it there with its scorer (None: not scored). `cells[t]` says which cell trial t belongs
    to: at the halving points of its cell's schedule (`hparams["halving"]`, select.go_on) the scored
    trials of a cell that are clearly behind stop. None: every trial is its own cell (no halving)."""
    device, cache = view.device, view.data
    seed = trials[0].seed
    t0 = time.perf_counter()
    # Every head of a seed starts from the same draw, and every stack of a seed sees the same batches.
    heads = [
        get_head(c.hparams["head"])(cache, torch.Generator().manual_seed(seed)).to(device) for c in trials
    ]
    at = checkpoints(trials[0], steps) if steps else [0]
    traces = [
        Trace(c, h, [], [], [] if s is not None else None)
        for c, h, s in zip(trials, heads, scorers, strict=True)
    ]
    bf16 = getattr(view, "precision", "fp32") == "bf16"
    running = [True] * len(trials)
    cells = list(range(len(trials))) if cells is None else list(cells)
    members: dict[int, list[int]] = {}
    for t, c in enumerate(cells):
        if scorers[t] is not None:
            members.setdefault(c, []).append(t)
    halve = {c: halving_points(trials[ts[0]].hparams.get("halving") or (), at) for c, ts in members.items()}

    def evaluate(step: int) -> list[bool]:
        k = at.index(step)
        for t, (tr, scorer) in enumerate(zip(traces, scorers, strict=True)):
            if not running[t]:
                continue
            tr.steps.append(step)
            tr.snapshots.append([p.detach().clone() for p in _trained(tr.head)])
            if scorer is not None:
                tr.scores.append(scorer(tr.head, tr.trial.method, bf16))
        for c, ts in members.items():
            if k in halve[c]:
                rows = scorers[ts[0]].rows
                on = go_on([traces[t].scores for t in ts], [running[t] for t in ts], rows)
                for t, still in zip(ts, on, strict=True):
                    if running[t] and not still:
                        running[t], traces[t].stopped = False, step
        return running

    if steps:
        finite = fit(
            heads, [c.loss_fn() for c in trials], [view.targets(c.method) for c in trials], view.x_train,
            [{"lr": c.hparams["lr"], "weight_decay": c.hparams["weight_decay"]} for c in trials],
            steps, trials[0].hparams["batch_size"], torch.Generator().manual_seed(seed), evaluate, set(at),
            bf16,
        ).tolist()  # fmt: skip
    else:
        evaluate(0)
        finite = [True] * len(trials)
    seconds = (time.perf_counter() - t0) / len(trials)
    for tr, ok in zip(traces, finite, strict=True):
        tr.finite, tr.seconds = bool(ok), seconds
    return traces


def _record(
    cell: Cell,
    dt: DomainTensors,
    trace: Trace | None,
    pick: int,
    *,
    budget: int = 0,
    stack: list[str] | None = None,
    seconds: float = 0.0,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A cell's result from its chosen trace at checkpoint `pick`: test accuracy there and the curve of
    the whole run (train agreement on a fixed sample of train rows, test accuracy), read only now."""
    hp = cell.hparams
    head = None if trace is None else trace.head
    curve: list[dict[str, Any]] = []
    train_acc: float | None = 1.0
    if head is None:  # the weak supervisor itself
        pred_test = dt.weak_test
    else:
        probe = torch.randperm(len(dt.train), generator=torch.Generator().manual_seed(cell.seed))
        probe = probe[:CURVE_TRAIN_ROWS].to(dt.device)
        x_probe, weak_probe = dt.x_train[probe], dt.weak_train[probe].argmax(dim=1)
        pred_test, train_acc = None, None
        for k, step in enumerate(trace.steps if budget else []):
            trace.load(k)
            agree = (predict(head, x_probe) == weak_probe).float().mean().item() if len(probe) else None
            pred = predict(head, dt.x_test)
            curve.append(
                {"step": step, "train_acc": agree, "test_acc": (pred == dt.y_test).float().mean().item()}
            )
            if k == pick:
                pred_test, train_acc = pred, agree
        if pred_test is None:  # no curve: the head as it starts
            trace.load(pick)
            pred_test = predict(head, dt.x_test)
            train_acc = (predict(head, x_probe) == weak_probe).float().mean().item() if len(probe) else None
        trace.load(pick)  # health reads the chosen parameters
    flags = [] if head is None else health(pred_test, trace.finite, head, dt.data.num_classes)
    extra: dict[str, Any] = {}
    if hp["head"] == "prompt" and head is not None:  # how the context was set up: fixed per head
        extra["head_config"] = {"n_ctx": head.n_ctx, "init": PROMPT_INIT}
    return {
        "domain": dt.data.manifest.get("domain"),
        "method": cell.name,
        "base_method": cell.method.name,
        "head": hp["head"],
        "loss": hp["loss"],
        "seed": cell.seed,
        "hparams": hp,
        **extra,
        "steps": 0 if trace is None or not budget else trace.steps[pick],
        "budget": budget,
        "metrics": {
            "test_acc": (pred_test == dt.y_test).float().mean().item(),
            "weak_agreement": (pred_test == dt.weak_test).float().mean().item(),
            "train_acc": train_acc,
        },
        "flags": flags,
        "curve": curve,
        "seconds": seconds,  # its trials' share of their stack's wall time
        "stack": stack or [cell.name],
        "selection": selection or {"protocol": "none" if budget else None},
        "device": dt.device,
        "precision": dt.precision,
        "cache": dt.data.identity(),
    }


def stack_key(cell: Cell, n: int) -> tuple[Any, ...]:
    """Cells with the same key train as one stack."""
    return (cell.hparams["head"], cell.steps(n), cell.hparams.get("batch_size"), cell.seed)


def protocol_of(cell: Cell, dt: DomainTensors) -> str | None:
    """How a cell's result is chosen on this domain: its `select`, except that `hold` falls back to
    `weak` on a cache without labelled hold rows (said once by `train_cells`); None: it trains nothing."""
    if not cell.method.trains or cell.steps(len(dt.train)) == 0:
        return None if not cell.method.trains else "none"
    select = cell.hparams.get("select", "none")
    return "weak" if select == "hold" and len(dt.hold) == 0 else select


def train_cells(
    cells: Sequence[Cell], dt: DomainTensors, out: Path, done: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Train every cell on one domain, writing each record as soon as it is final; returns the records
    in the order of `cells`. All candidates of a domain's cells that share `stack_key` train as one
    stack on all of train (`--select weak`: on train less a slice first, then the chosen on all)."""
    n = len(dt.train)
    for c in cells:  # checked before anything is trained or written
        if c.hparams.get("head") in TEXT_HEADS and dt.data.text_embeds is None:
            raise UserError(
                f"{dt.where} has no text.h5, whose class text embeddings {c.method.name}'s "
                f"{c.hparams['head']} head starts from; rerun extract for this domain with --overwrite"
            )
    protocols = [protocol_of(c, dt) for c in cells]
    for c, p in zip(cells, protocols, strict=True):
        if c.steps(1) and n == 0:
            raise UserError(f"{dt.where} has no train rows to train on; extract the domain's train list too")
        if c.steps(n) > MAX_STEPS:
            raise UserError(
                f"{c.name} would take {c.steps(n):,} steps on {dt.where}'s {n:,} train rows, more than "
                f"{MAX_STEPS:,}; lower epochs or min_steps"
            )
        if p == "weak" and n < 2:
            raise UserError(
                f"{dt.where} has {n} train row(s): --select weak needs at least 2, one to hold out and one "
                "to train on; use --select none or extract more train rows"
            )
    fallback = None
    if any(p == "weak" and c.hparams.get("select") == "hold" for c, p in zip(cells, protocols, strict=True)):
        fallback = f"{dt.where} has no labelled hold rows, so candidates are scored as --select weak does"
        print(f"note: {fallback}", file=sys.stderr)
    records: list[dict[str, Any]] = [{} for _ in cells]

    def finish(i: int, record: dict[str, Any]) -> None:
        records[i] = _write([record], out)[0]

    # Softmax of confident logits and Adam's squared gradients underflow to subnormal floats, which x86
    # CPUs process tens of times slower; flushing them to zero changes no result that matters. Only
    # while training: the caller's floating-point mode is left as it was found (off, torch's default).
    flush = dt.device == "cpu" and torch.set_flush_denormal(True)
    try:
        for i, c in enumerate(cells):  # weak and zeroshot: nothing to train
            if protocols[i] is None or (protocols[i] == "none" and c.steps(n) == 0):
                trace = None
                if c.hparams["head"] is not None:
                    (trace,) = train_stack([c], dt, 0, [None])
                finish(i, _record(c, dt, trace, 0, stack=[c.name]))
                if done is not None:
                    done(1)
        todo = [i for i in range(len(cells)) if records[i] == {}]
        hold = HoldScore(dt) if any(protocols[i] == "hold" for i in todo) else None
        # First pass: on all of train (hold, none) and on the slices (weak), every trial of a cell in
        # one stack. The weak cells' chosen trials then train on all of train in a second pass.
        first = [i for i in todo if protocols[i] != "weak"]
        for stack in _stacks([cells[i] for i in first], n):
            _run(cells, [first[j] for j in stack], dt, dt, hold, finish, done)
        weak = [i for i in todo if protocols[i] == "weak"]
        chosen: dict[int, tuple[Cell, dict[str, Any], int]] = {}
        for seed in dict.fromkeys(cells[i].seed for i in weak):
            view = SliceView(dt, seed)
            mine = [i for i in weak if cells[i].seed == seed]
            for stack in _stacks([cells[i] for i in mine], n):
                _run(cells, [mine[j] for j in stack], view, dt, view, chosen.__setitem__, None)
        for stack in _stacks([chosen[i][0] for i in weak], n):
            group = [weak[j] for j in stack]
            trial_cells = [chosen[i][0] for i in group]
            traces = train_stack(trial_cells, dt, trial_cells[0].steps(n), [None] * len(group))
            names = list(dict.fromkeys(cells[i].name for i in group))
            for i, tr in zip(group, traces, strict=True):
                _, sel, pick = chosen[i]
                if fallback:
                    sel = {**sel, "fallback": fallback}
                rec = _record(cells[i], dt, tr, pick, budget=cells[i].steps(n), stack=names,
                              seconds=tr.seconds + sel.pop("_seconds"), selection=sel)  # fmt: skip
                finish(i, rec)
            if done is not None:
                done(len(group))
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return records


def _run(
    cells: Sequence[Cell],
    group: Sequence[int],
    view: Any,
    dt: DomainTensors,
    scorer: Callable[..., int] | None,
    finish: Callable[[int, Any], None],
    done: Callable[[int], None] | None,
) -> None:
    """Train the trials of `cells[group]` (one stack) on `view`, choose each cell's point and pass it to
    `finish`: the record, or for a slice view (`--select weak`) the chosen trial to train on all of train."""
    n = len(dt.train)
    per_cell = [trials(cells[i]) if cells[i].hparams.get("select", "none") != "none" else [({}, cells[i])]
                for i in group]  # fmt: skip
    flat = [(i, values, trial) for i, ts in zip(group, per_cell, strict=True) for values, trial in ts]
    scoring = {i: scorer if cells[i].hparams.get("select", "none") != "none" else None for i in group}
    steps = cells[group[0]].steps(n)
    traces = train_stack(
        [t for _, _, t in flat], view, steps, [scoring[i] for i, _, _ in flat], [i for i, _, _ in flat]
    )
    names = list(dict.fromkeys(cells[i].name for i in group))
    for i in group:
        mine = [(values, tr) for (j, values, _), tr in zip(flat, traces, strict=True) if j == i]
        seconds = sum(tr.seconds for _, tr in mine)
        if scoring[i] is None:  # --select none: the fixed values, trained to the end
            tr = mine[0][1]
            last = len(tr.steps) - 1
            finish(i, _record(cells[i], dt, tr, last, budget=steps, stack=names, seconds=seconds))
            continue
        t, k = choose([tr.scores for _, tr in mine], [tr.finite for _, tr in mine])
        sel = selection_record(
            scoring[i].protocol, scoring[i].what, [v for v, _ in mine], checkpoints(cells[i], steps),
            [tr.scores for _, tr in mine], scoring[i].rows, (t, k),
            halving=cells[i].hparams.get("halving"), stopped=[tr.stopped for _, tr in mine],
        )  # fmt: skip
        if isinstance(view, SliceView):
            finish(i, (mine[t][1].trial, {**sel, "_seconds": seconds}, k))
        else:
            finish(i, _record(cells[i], dt, mine[t][1], k, budget=steps, stack=names, seconds=seconds,
                              selection=sel))  # fmt: skip
    if done is not None and not isinstance(view, SliceView):
        done(len(group))


def _stacks(cells: Sequence[Cell], n: int) -> list[list[int]]:
    """The cells' positions grouped by `stack_key`, in first-seen order."""
    stacks: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(cells):
        stacks.setdefault(stack_key(c, n), []).append(i)
    return list(stacks.values())


def _write(records: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Write each record atomically to its results path; return them with `path` added."""
    from cpl_cache.cache import atomic_write_text

    written = []
    for record in records:
        path = result_path(out, record["domain"], record["method"], record["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        written.append({**record, "path": str(path)})
    return written


def run_training(cfg: TrainConfig, data: CachedDomain | DomainTensors | None = None) -> dict[str, Any]:
    """Train one method, write its results JSON atomically and return it.

    `data` is the domain's cache, loaded unless given, or its `DomainTensors` on the run's device.
    """
    from cpl_cache.cache import domain_dir, load_domain
    from cpl_cache.runtime import resolve_device, resolve_precision

    cell = Cell.of(cfg)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a bad value fails before the cache loads
    if data is None:
        data = load_domain(cfg.cache_dir, cfg.domain)
    cache = data.data if isinstance(data, DomainTensors) else data
    if cache.manifest.get("domain") != cfg.domain:
        raise ValueError(
            f"data holds domain {cache.manifest.get('domain')!r}, the config says {cfg.domain!r}"
        )
    precision = resolve_precision(cfg.precision, device, cache.dim * cache.num_classes)
    if isinstance(data, DomainTensors) and data.device == device and data.precision == precision:
        dt = data
    else:
        dt = DomainTensors(cache, device, str(domain_dir(cfg.cache_dir, cfg.domain)), precision)
    return train_cells([cell], dt, cfg.out)[0]
