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

import dataclasses
import json
import math
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
from cpl_cache.train.heads import PROMPT_INIT, get_head
from cpl_cache.train.losses import get_loss
from cpl_cache.train.methods import HPARAMS, Method, get_method, resolve_hparams

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
    select: bool = False  # choose the step size on a held-out slice of train (`select_lr`)


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
        hparams, changed = resolve_hparams(method, dict(cfg.overrides), select=cfg.select and method.trains)
        order = [*HPARAMS, *hparams.get("loss_args", {})]
        name = method.name + "".join(
            f"+{k}={changed[k]:g}" if isinstance(changed[k], float) else f"+{k}={changed[k]}"
            for k in order
            if k in changed
        )
        return cls(method, cfg.seed, hparams, name + ("+select" if "select_lr" in hparams else ""))

    def steps(self, n: int) -> int:
        """Optimiser steps on n train rows: max(min_steps, epochs x steps per epoch); none at 0 epochs."""
        hp = self.hparams
        if not self.method.trains or hp["epochs"] == 0 or n == 0:
            return 0
        return max(hp["min_steps"], hp["epochs"] * math.ceil(n / min(hp["batch_size"], n)))

    def loss_fn(self) -> Callable[[Tensor, Tensor, float], Tensor]:
        return partial(get_loss(self.hparams["loss"]), **self.hparams["loss_args"])


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
    """One domain's tensors on one device, made once and shared by every run on it."""

    def __init__(self, data: CachedDomain, device: str, where: str | None = None) -> None:
        self.data, self.device = data, device
        self.where = where or f"the cache of {data.manifest.get('domain')}"
        check_domain(data, self.where)
        self.train, self.test = data.rows("train"), data.rows("test")
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
    def weak_train(self) -> Tensor:
        return self.data.weak_logits.index_select(0, self.train).to(self.device)

    @cached_property
    def truth_train(self) -> Tensor:
        """Ground truth of the train rows as logits: 0 on the true class, TRUTH_OFF elsewhere."""
        y = self.data.labels[self.train].to(self.device)
        K = self.data.num_classes
        if bool((y < 0).any() or (y >= K).any()):
            raise UserError(f"train labels of {self.where} fall outside 0..{K - 1}; re-extract the cache")
        return torch.full((len(y), K), TRUTH_OFF, device=self.device).scatter_(1, y[:, None], 0.0)

    def targets(self, method: Method) -> Tensor:
        return self.truth_train if method.uses_ground_truth else self.weak_train


class HeldOut:
    """A domain's train rows less a seeded slice (`val`), standing in for `DomainTensors` in `train_stack`
    when step sizes are selected: heads fit the rest and are scored on the slice by agreement with its
    weak labels (the ceilings only: its ground truth; never `hold` or `test`). The chosen step size is
    then trained on all of train (`select_and_train`)."""

    def __init__(self, dt: DomainTensors, seed: int) -> None:
        n = len(dt.train)  # at least 2: train_cells refuses fewer before any training
        k = max(1, round(SELECT_HOLDOUT * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self._dt, self._val, self._fit = dt, perm[:k].to(dt.device), perm[k:].to(dt.device)
        self.data, self.device, self.where = dt.data, dt.device, dt.where
        self.train = dt.train[perm[k:]]
        self.x_train, self.weak_train = dt.x_train[self._fit], dt.weak_train[self._fit]
        self.x_test, self.y_test, self.weak_test = dt.x_test, dt.y_test, dt.weak_test
        self.x_val, self.weak_val = dt.x_train[self._val], dt.weak_train[self._val].argmax(dim=1)

    @cached_property
    def truth_train(self) -> Tensor:
        return self._dt.truth_train[self._fit]

    @cached_property
    def y_val(self) -> Tensor:
        return self._dt.truth_train[self._val].argmax(dim=1)

    def targets(self, method: Method) -> Tensor:
        return self.truth_train if method.uses_ground_truth else self.weak_train

    def score(self, head: nn.Module, method: Method) -> float:
        """What selection maximises: agreement with the slice's weak labels (ceilings: accuracy)."""
        reference = self.y_val if method.uses_ground_truth else self.weak_val
        return (predict(head, self.x_val) == reference).float().mean().item()


@torch.no_grad()
def predict(head: nn.Module, x: Tensor) -> Tensor:
    """Argmax class of every row, a chunk at a time."""
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
    evaluate: Callable[[int], Any] | None = None,
    at: set[int] = frozenset(),
) -> Tensor:
    """Train a stack of heads on rows `x` (N, D), head h with `losses[h]` against `targets[h]` (N, K):
    AdamW with `groups[h]`'s lr and weight_decay, cosine schedule to zero, `steps` steps of `batch_size`
    rows from one seeded permutation per pass. `evaluate(step)` runs at the steps in `at`.

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
    for step in range(steps):
        if evaluate is not None and step in at:
            evaluate(step)
        i = step % per_epoch
        if i == 0:  # a fresh order per pass, drawn on the CPU so every device sees the same one
            perm = torch.randperm(n, generator=generator).to(x.device)
        idx = perm[i * bs : (i + 1) * bs]
        xb = x.index_select(0, idx)
        tb = [t.index_select(0, idx) for t in distinct]
        progress = step / steps
        values = [loss(head(xb), tb[w], progress) for head, loss, w in zip(heads, losses, which, strict=True)]
        opt.zero_grad(set_to_none=True)
        torch.stack(values).sum().backward()
        opt.step()
        schedule.step()
        finite &= torch.isfinite(torch.stack([v.detach() for v in values]))
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


def train_stack(cells: Sequence[Cell], dt: DomainTensors) -> list[dict[str, Any]]:
    """Train (or evaluate) cells that share a head kind, a step count, a batch size and a seed, as one
    stack, and return each one's record (not yet written)."""
    device, cache = dt.device, dt.data
    seed = cells[0].seed
    steps = cells[0].steps(len(dt.train))
    t0 = time.perf_counter()
    if cells[0].hparams["head"] is None:  # the weak supervisor itself
        return [_record(c, dt, dt.weak_test, 1.0, [], None, []) for c in cells]
    # Every head of a seed starts from the same draw, and every stack of a seed sees the same batches.
    heads = [
        get_head(c.hparams["head"])(cache, torch.Generator().manual_seed(seed)).to(device) for c in cells
    ]
    probe = torch.randperm(len(dt.train), generator=torch.Generator().manual_seed(seed))[:CURVE_TRAIN_ROWS]
    x_probe = dt.x_train[probe.to(device)]
    weak_probe = dt.weak_train[probe.to(device)].argmax(dim=1)
    curves: list[list[dict[str, Any]]] = [[] for _ in cells]
    preds: list[Tensor] = [dt.weak_test for _ in cells]
    probe_acc: list[float | None] = [None for _ in cells]

    def evaluate(step: int) -> None:
        for h, head in enumerate(heads):
            preds[h] = predict(head, dt.x_test)
            agree = (predict(head, x_probe) == weak_probe).float().mean().item() if len(probe) else None
            probe_acc[h] = agree
            test_acc = (preds[h] == dt.y_test).float().mean().item()
            curves[h].append({"step": step, "train_acc": agree, "test_acc": test_acc})

    if steps:
        hp = cells[0].hparams
        points = hp["curve_points"]
        finite = fit(
            heads, [c.loss_fn() for c in cells], [dt.targets(c.method) for c in cells], dt.x_train,
            [{"lr": c.hparams["lr"], "weight_decay": c.hparams["weight_decay"]} for c in cells],
            steps, hp["batch_size"], torch.Generator().manual_seed(seed), evaluate,
            {round(i * steps / points) for i in range(points + 1)},
        ).tolist()  # fmt: skip
    else:
        evaluate(0)
        finite, curves = [True] * len(cells), [[] for _ in cells]
    seconds = (time.perf_counter() - t0) / len(cells)
    names = [c.name for c in cells]
    records = [
        _record(c, dt, preds[h], probe_acc[h], curves[h], heads[h], health(
            preds[h], finite[h], heads[h], cache.num_classes
        ), seconds=seconds, steps=steps, stack=names)
        for h, c in enumerate(cells)
    ]  # fmt: skip
    if isinstance(dt, HeldOut):  # a selection trial: its score on the held-out slice
        for record, head, c in zip(records, heads, cells, strict=True):
            record["val_score"] = dt.score(head, c.method)
    return records


def _record(
    cell: Cell,
    dt: DomainTensors,
    pred_test: Tensor,
    train_acc: float | None,
    curve: list[dict[str, Any]],
    head: nn.Module | None,
    flags: list[str],
    *,
    seconds: float = 0.0,
    steps: int = 0,
    stack: list[str] | None = None,
) -> dict[str, Any]:
    hp = cell.hparams
    extra = {}
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
        "steps": steps,
        "metrics": {
            "test_acc": (pred_test == dt.y_test).float().mean().item(),
            "weak_agreement": (pred_test == dt.weak_test).float().mean().item(),
            "train_acc": train_acc,
        },
        "flags": flags,
        "curve": curve,
        "seconds": seconds,  # the stack's wall time over its cells
        "stack": stack or [cell.name],
        "device": dt.device,
        "cache": dt.data.identity(),
    }


def stack_key(cell: Cell, n: int) -> tuple[Any, ...]:
    """Cells with the same key train as one stack."""
    return (cell.hparams["head"], cell.steps(n), cell.hparams.get("batch_size"), cell.seed)


def train_cells(
    cells: Sequence[Cell], dt: DomainTensors, out: Path, done: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Train every cell on one domain, stacked by `stack_key`, writing each record as its stack ends;
    returns the records in the order of `cells`. Cells that select their step size train as trials."""
    n = len(dt.train)
    for c in cells:
        if c.steps(1) and n == 0:
            raise UserError(f"{dt.where} has no train rows to train on; extract the domain's train list too")
        if "select_lr" in c.hparams and n < 2:
            raise UserError(
                f"{dt.where} has {n} train row(s): --select needs at least 2, one to hold out and one to "
                "train on; drop --select or extract more train rows"
            )
    records: list[dict[str, Any]] = [{} for _ in cells]  # each position filled by its stack below
    # Softmax of confident logits and Adam's squared gradients underflow to subnormal floats, which x86
    # CPUs process tens of times slower; flushing them to zero changes no result that matters. Only
    # while training: the caller's floating-point mode is left as it was found (off, torch's default).
    flush = dt.device == "cpu" and torch.set_flush_denormal(True)
    try:
        selecting = [i for i, c in enumerate(cells) if "select_lr" in c.hparams]
        fixed = [i for i, c in enumerate(cells) if "select_lr" not in c.hparams]
        for stack in _stacks([cells[i] for i in fixed], n):
            positions = [fixed[j] for j in stack]
            stack_records = _write(train_stack([cells[i] for i in positions], dt), out)
            for i, record in zip(positions, stack_records, strict=True):
                records[i] = record
            if done is not None:
                done(len(stack))
        if selecting:
            chosen = _write(select_and_train([cells[i] for i in selecting], dt), out)
            for i, record in zip(selecting, chosen, strict=True):
                records[i] = record
            if done is not None:
                done(len(selecting))
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return records


def _stacks(cells: Sequence[Cell], n: int) -> list[list[int]]:
    """The cells' positions grouped by `stack_key`, in first-seen order."""
    stacks: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(cells):
        stacks.setdefault(stack_key(c, n), []).append(i)
    return list(stacks.values())


def select_and_train(cells: Sequence[Cell], dt: DomainTensors) -> list[dict[str, Any]]:
    """For each cell, one trial per step size of its `select_lr`, trained on train less a seeded 10%
    (`HeldOut`) and scored on that slice (agreement with the weak labels; accuracy for the ceilings).
    The best-scoring step size then trains on all of train, as a cell given it outright would, and that
    run is the cell's result; its record keeps the cell's planned hparams (lr None, the candidates) and
    says what was chosen and each trial's score. Every trial of one seed trains in the same stacks, on
    the same rows."""
    trials = [
        (i, lr, dataclasses.replace(c, hparams={**c.hparams, "lr": lr}, name=f"{c.name}@{lr:g}"))
        for i, c in enumerate(cells)
        for lr in c.hparams["select_lr"]
    ]
    scores: list[dict[float, float]] = [{} for _ in cells]
    for seed in dict.fromkeys(c.seed for c in cells):
        view = HeldOut(dt, seed)
        runs = [t for t in trials if cells[t[0]].seed == seed]
        for stack in _stacks([t[2] for t in runs], len(view.train)):
            for j, record in zip(stack, train_stack([runs[j][2] for j in stack], view), strict=True):
                i, lr, _ = runs[j]
                scores[i][lr] = record["val_score"]
    best = [max(by_lr, key=lambda lr: by_lr[lr]) for by_lr in scores]  # the first of equal scores
    final = [dataclasses.replace(c, hparams={**c.hparams, "lr": b}) for c, b in zip(cells, best, strict=True)]
    records: list[dict[str, Any]] = [{} for _ in cells]
    for stack in _stacks(final, len(dt.train)):
        for i, record in zip(stack, train_stack([final[i] for i in stack], dt), strict=True):
            truth = cells[i].method.uses_ground_truth
            records[i] = {**record, "hparams": cells[i].hparams, "selection": {
                "selected": {"lr": best[i]},
                "scores": {f"{lr:g}": v for lr, v in scores[i].items()},
                "score": "accuracy against its ground truth" if truth else "agreement with its weak labels",
                "on": f"{SELECT_HOLDOUT:.0%} of train held out, then the chosen step size on all of train",
            }}  # fmt: skip
    return records


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
    from cpl_cache.runtime import resolve_device

    cell = Cell.of(cfg)
    device = resolve_device(cfg.device)
    if data is None:
        data = load_domain(cfg.cache_dir, cfg.domain)
    cache = data.data if isinstance(data, DomainTensors) else data
    if cache.manifest.get("domain") != cfg.domain:
        raise ValueError(
            f"data holds domain {cache.manifest.get('domain')!r}, the config says {cfg.domain!r}"
        )
    if isinstance(data, DomainTensors) and data.device == device:
        dt = data
    else:
        dt = DomainTensors(cache, device, str(domain_dir(cfg.cache_dir, cfg.domain)))
    return train_cells([cell], dt, cfg.out)[0]
