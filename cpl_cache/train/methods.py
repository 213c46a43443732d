"""The method registry behind `--method`, and every stage-two hyperparameter with its default.

A method is a head, a loss, what it trains against, and its hyperparameters; `HPARAMS` declares each
hyperparameter once (type, range, help), and a loss's constants (alpha, warmup, beta, ramp, tau, T...)
are the keyword defaults of its function in `losses.py`. `resolve_hparams` applies overrides from the
command line or a grid file to a method's defaults, checks them, and returns what a run records.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cpl_cache.errors import UserError


@dataclass(frozen=True)
class HParam:
    """One overridable hyperparameter: its type, the range it may take, and what it means."""

    kind: type
    help: str
    minimum: float | None = None
    positive: bool = False  # strictly above `minimum`
    maximum: float | None = None


# No run takes more optimiser steps than this (about a day of the Table 2 grid's steps on one GPU): a
# larger request is a typo, refused in one line rather than run for years.
MAX_STEPS = 10_000_000


HPARAMS: dict[str, HParam] = {
    "head": HParam(str, "the head: proto, linear or prompt"),
    "loss": HParam(str, "the loss (see `cpl-cache methods`)"),
    "epochs": HParam(int, "passes over train", minimum=0, maximum=MAX_STEPS),
    "min_steps": HParam(
        int, "optimiser steps at least, whatever the domain's size", minimum=0, maximum=MAX_STEPS
    ),
    "lr": HParam(float, "peak AdamW step size (cosine schedule to zero)", minimum=0, positive=True),
    "batch_size": HParam(int, "rows per step", minimum=1),
    "weight_decay": HParam(float, "AdamW's decoupled weight decay", minimum=0),
}


# The fractions of a run at which selection stops a cell's trials that are clearly behind.
HALVING = (0.3, 0.6)


@dataclass(frozen=True)
class Method:
    """A registry entry. `targets` is "weak" (weak logits of `train` rows: no ground truth is read
    outside `test`), "truth" (ground-truth labels of `train` rows: the ceilings) or None (no training).

    A run takes max(min_steps, epochs x steps per epoch) optimiser steps, so that a small domain trains
    as far as a large one (a 3,000-row domain gets three steps an epoch at batch 1024)."""

    name: str
    summary: str
    head: str | None
    loss: str | None
    targets: str | None = "weak"
    epochs: int = 5
    min_steps: int = 500
    lr: float = 1e-3
    batch_size: int = 1024
    weight_decay: float = 0.0
    loss_args: Mapping[str, float] = field(default_factory=dict)  # the loss's constants, if not its own
    curve_points: int = 10  # evaluations spread evenly over training, plus one before the first step
    # What selection (`--select hold` or `weak`, cpl_cache.train.select) chooses among: every combination
    # of these values (step size, weight decay, a loss constant) is one candidate, each scored at every
    # checkpoint of its run. `--select none` trains the fixed values above.
    candidates: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # Successive halving while selecting (cpl_cache.train.select.go_on): at these fractions of the run a
    # cell's trials that are clearly behind on their scores so far stop training. () trains every trial
    # to the end (the full search).
    halving: tuple[float, ...] = HALVING

    @property
    def trains(self) -> bool:
        return self.targets is not None

    @property
    def uses_ground_truth(self) -> bool:
        return self.targets == "truth"


# Fixed values (`--select none`) chosen on planted caches of 33,525 and 120,750 train rows (512-d, 345
# classes) and checked on a 3,000-row mixture cache and the demo's ~300-row domains: five epochs, but at
# least 500 steps (a 3,000-row domain got 15 steps from its five epochs, a 30,000-row one 150). The
# linear head starts at random and takes a larger step than the prototypes, which start at the
# zero-shot classifier. No one step size suits every cache (docs/losses.md), so by default each method
# chooses among its `candidates`, log grids of five step sizes spanning 100x, and the checkpoints of each
# run, by accuracy on the hold rows (`--select hold`, cpl_cache.train.select). The linear grid was moved
# one step down (from 1e-2..1 to 3e-3..3e-1) on the zoo's tune half (`cpl-cache bench-regret`): on its
# 300- to 3,000-row caches the probes chose the lowest step size at the first checkpoints, and the best
# test accuracy lay below the grid. The ceilings also choose their weight decay, as CLIP_benchmark's
# probe does, and KD its temperature: at T = 1 its gradient is soft cross-entropy's, so kd-lp would
# repeat naive-lp row for row. ceiling-lp's weight decay was (0, 1e-3, 1e-2, 1e-1); the middle two were
# never needed: choosing among (0, 1e-1) gives the same test accuracy on all twelve zoo caches, half the
# heads (benchmarks/bench_halving.py, bench-results/halving.json). KD's three temperatures are all needed:
# without T = 2, kd-lp loses 3.3 points on one judge cache.
_LP_LR = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
_PROTO_LR = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
_LP = dict(
    head="linear", epochs=5, min_steps=500, lr=1e-1, batch_size=1024, weight_decay=1e-4,
    candidates={"lr": _LP_LR},
)  # fmt: skip
_LP_TRUTH = {**_LP, "candidates": {"lr": _LP_LR, "weight_decay": (0.0, 1e-1)}}
_PROTO = dict(
    head="proto", epochs=5, min_steps=500, lr=3e-4, batch_size=1024, weight_decay=0.0,
    candidates={"lr": _PROTO_LR},
)  # fmt: skip
_PROTO_TRUTH = {**_PROTO, "lr": 1e-3, "candidates": {"lr": _PROTO_LR, "weight_decay": (0.0, 1e-1)}}
# The text-prompt head (CoOp) trains a few context vectors through the frozen text encoder. As with the
# prototypes, a step that suits ground truth (2e-3, CoOp's) memorises weak labels: on the demo's tiny
# CLIP, Naive+TP falls from zero-shot's 75% to 40% at 2e-3 and stays at 77% at 2e-4 (clipart, seed 0).
_TP_LR = (2e-5, 6e-5, 2e-4, 6e-4, 2e-3)
_TP = dict(
    head="prompt", epochs=10, lr=2e-4, batch_size=1024, weight_decay=0.0, min_steps=200,
    candidates={"lr": _TP_LR},
)  # fmt: skip
_TP_TRUTH = {**_TP, "lr": 2e-3, "candidates": {"lr": (2e-4, 6e-4, 2e-3, 6e-3, 2e-2)}}
_KD_T = (1.0, 2.0, 4.0)

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("weak", "the weak supervisor's own predictions (no training)", None, None, targets=None),
        Method("zeroshot", "CLIP zero-shot: text prototypes, no training", "proto", None, targets=None),
        Method(
            "ceiling",
            "strong ceiling: prototypes trained on ground truth",
            loss="hard",
            targets="truth",
            **_PROTO_TRUTH,
        ),
        Method(
            "ceiling-lp",
            "strong ceiling: linear probe on ground truth",
            loss="hard",
            targets="truth",
            **_LP_TRUTH,
        ),
        Method("naive-lp", "linear probe, cross-entropy to softmax(weak)", loss="soft", **_LP),
        Method(
            "kd-lp",
            "linear probe, KD from the weak logits",
            loss="kd",
            **{**_LP, "candidates": {"lr": _LP_LR, "T": _KD_T}},
        ),
        Method("auxconf-lp", "linear probe, auxiliary confidence loss", loss="auxconf", **_LP),
        Method("augconf-lp", "linear probe, augmented confidence loss", loss="augconf", **_LP),
        Method("adaptconf-lp", "linear probe, adaptive confidence loss", loss="adaptconf", **_LP),
        Method(
            "cpl",
            "class prototype learning: prototypes from text, KD from the weak logits",
            loss="kd",
            **_PROTO,
        ),
        Method("naive-tp", "text prompt (CoOp), cross-entropy to softmax(weak)", loss="soft", **_TP),
        Method("kd-tp", "text prompt (CoOp), KD from the weak logits", loss="kd", **_TP),
        Method("auxconf-tp", "text prompt (CoOp), auxiliary confidence loss", loss="auxconf", **_TP),
        Method(
            "ceiling-tp",
            "strong ceiling: text prompt on ground truth",
            loss="hard",
            targets="truth",
            **_TP_TRUTH,
        ),
    ]
}


def get_method(name: str) -> Method:
    """The method registered as `name`, or a UserError listing the valid names."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def loss_constants(loss: str) -> dict[str, Any]:
    """The constants of a registered loss and their defaults: its keyword-only arguments."""
    from cpl_cache.train.losses import get_loss

    params = inspect.signature(get_loss(loss)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check(key: str, value: Any, spec: HParam, where: str) -> Any:
    """`value` as the hyperparameter's type, or a UserError naming the key and what it takes."""
    kind = spec.kind
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and kind is float and not math.isfinite(value):
        ok = False
    if ok and spec.minimum is not None:
        ok = value > spec.minimum if spec.positive else value >= spec.minimum
    if ok and spec.maximum is not None:
        ok = value <= spec.maximum
    if not ok:
        what = {str: "a name", int: "an integer", float: "a number"}[kind]
        if spec.minimum is not None:
            what += f" {'>' if spec.positive else '>='} {spec.minimum:g}"
        if spec.maximum is not None:
            what += f"{' and' if spec.minimum is not None else ''} <= {spec.maximum:g}"
        raise UserError(f"{where}{key} must be {what} ({spec.help}), got {value!r}")
    return value


# The range of every loss constant (`losses.py`'s keyword arguments), by name: a constant means the same
# in every loss that takes it. A loss constant without an entry here is refused by the test suite.
CONSTANTS: dict[str, HParam] = {
    "T": HParam(float, "the distillation temperature", minimum=0, positive=True),
    "tau": HParam(float, "AdaptConf's temperature of the per-row weight", minimum=0, positive=True),
    "alpha": HParam(float, "AuxConf's final weight of the student's own hard labels", minimum=0, maximum=1),
    "beta": HParam(float, "AugConf's final weight of the student's own hard labels", minimum=0, maximum=1),
    "warmup": HParam(float, "the share of training over which a weight ramps up", minimum=0, maximum=1),
    "ramp": HParam(float, "the share of training over which a weight ramps up", minimum=0, maximum=1),
    "stairs": HParam(
        int, "the number of equal parts of the staircase schedule", minimum=1, maximum=MAX_STEPS
    ),
}


# How a run's reported point is chosen (cpl_cache.train.select): by accuracy on the hold rows' ground
# truth (the default), by agreement with the weak labels on a slice of train the candidates did not fit,
# or not at all (the fixed values). A run name carries a protocol other than the default.
PROTOCOLS = ("hold", "weak", "none")
DEFAULT_PROTOCOL = "hold"
# Settings that may take a list of candidates: those that change neither the head, the step count nor
# the batches, so that every candidate of a cell trains in one stack.
CANDIDATE_KEYS = ("lr", "weight_decay")


def check_protocol(select: Any, where: str = "") -> str:
    if select not in PROTOCOLS:
        raise UserError(f"{where}--select must be one of {', '.join(PROTOCOLS)}, got {select!r}")
    return select


def resolve_hparams(
    method: Method, overrides: Mapping[str, Any], where: str = "", *, select: str = DEFAULT_PROTOCOL
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hyperparameters a run of `method` uses, and the overrides that differ from its defaults.

    `overrides` may set any key of HPARAMS and any constant of the (possibly overridden) loss; values
    are checked for type and range, and a problem is a UserError prefixed by `where`. A list of values
    for lr, weight_decay or a loss constant is a list of candidates, which `select` ("hold" or "weak")
    chooses among; a single value pins that setting. The first dict is what the results JSON records as
    `hparams`: under selection each candidate setting is None in its place and its values are listed in
    `candidates` (the results' `selection` says which were taken)."""
    from cpl_cache.train.heads import get_head

    check_protocol(select, where)
    if not method.trains:
        if overrides:
            raise UserError(
                f"method {method.name!r} trains nothing, so {', '.join(overrides)} do not apply; "
                "pick a method that trains (see `cpl-cache methods`)"
            )
        return {"head": method.head, "loss": None, "targets": None}, {}
    loss = overrides.get("loss", method.loss)
    if not isinstance(loss, str):
        raise UserError(f"{where}loss must be a name, got {loss!r}")
    constants = loss_constants(loss)
    allowed = [*HPARAMS, *constants]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise UserError(
            f"{where}unknown setting(s) {', '.join(unknown)}; {method.name} with loss {loss} takes "
            f"{', '.join(allowed)}"
        )
    defaults = {k: getattr(method, k) for k in HPARAMS}
    constants.update(method.loss_args if loss == method.loss else {})
    checked: dict[str, Any] = {}
    listed: dict[str, tuple[Any, ...]] = {}
    for key, value in overrides.items():
        kind = int if type(constants.get(key)) is int else float
        spec = HPARAMS.get(key) or CONSTANTS.get(key) or HParam(kind, f"a constant of the loss {loss}")
        if isinstance(value, (list, tuple)):
            if key not in CANDIDATE_KEYS and key not in constants:
                raise UserError(
                    f"{where}{key} takes one value; lists of candidates are for "
                    f"{', '.join([*CANDIDATE_KEYS, *constants])}"
                )
            if not value:
                raise UserError(f"{where}{key} lists no candidates; give at least one, e.g. {key} = [0.1]")
            if select == "none":
                raise UserError(
                    f"{where}{key} lists candidates, which --select none does not choose among; "
                    "give one value or use --select hold"
                )
            values = tuple(dict.fromkeys(_check(key, v, spec, where) for v in value))
            listed[key] = values
            checked[key] = list(values)
        else:
            checked[key] = _check(key, value, spec, where)
    get_head(checked.get("head", method.head))
    if checked.get("epochs", method.epochs) == 0 and checked.get("min_steps", method.min_steps) == 0:
        raise UserError(
            f"{where}epochs = 0 and min_steps = 0 train nothing; a run takes max(min_steps, epochs x steps "
            "per epoch) steps: set either above 0"
        )
    record = {
        **{k: checked.get(k, v) for k, v in defaults.items()},
        "loss_args": {k: checked.get(k, v) for k, v in constants.items()},
        "targets": method.targets,
        "curve_points": method.curve_points,
        "optimizer": "adamw",
        "schedule": "cosine",
        "select": select,
    }
    if select != "none":
        # Another loss may lack a constant this method chooses (cpl with loss=soft has no T to choose).
        own = {k: v for k, v in method.candidates.items() if k in record or k in record["loss_args"]}
        grid = {k: tuple(v) for k, v in own.items() if k not in checked}  # a single value pins its key
        grid.update(listed)
        record["candidates"] = {k: list(v) for k, v in grid.items()}
        record["halving"] = list(method.halving)
        for key in grid:
            if key in record["loss_args"]:
                record["loss_args"][key] = None
            else:
                record[key] = None
    changed = {k: v for k, v in checked.items() if v != {**defaults, **constants}.get(k)}
    if select != DEFAULT_PROTOCOL:
        changed["select"] = select
    return record, changed
