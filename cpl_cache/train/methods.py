"""The method registry behind `--method`: each row a head, a loss, its targets and its defaults.

Every default of stage two lives in this table (and `Method`'s field defaults); the trainer reads
them from here and the command line overrides them per run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A registry entry. `targets` is "weak" (weak logits of `train` rows: no ground truth is read
    outside `test`), "truth" (ground-truth labels of `train` rows: the ceilings) or None (no training)."""

    name: str
    summary: str
    head: str | None
    loss: str | None
    targets: str | None = "weak"
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 1024
    weight_decay: float = 0.0
    curve_points: int = 10  # evaluations spread evenly over training, plus one before the first step

    @property
    def trains(self) -> bool:
        return self.targets is not None

    @property
    def uses_ground_truth(self) -> bool:
        return self.targets == "truth"


# Defaults chosen on a planted quickdraw-size cache (120,750 train rows; see benchmarks/bench_train.py):
# five epochs of batch 1024 reach what ten epochs of batch 100 reach. The linear head starts at random
# and needs a larger step than the prototypes, which start at the zero-shot classifier.
_LP = dict(head="linear", epochs=5, lr=1e-1, batch_size=1024, weight_decay=1e-4)
_PROTO = dict(head="proto", epochs=5, lr=1e-3, batch_size=1024, weight_decay=0.0)
# The text-prompt head (CoOp) trains a few context vectors through the frozen text encoder; CoOp's step 2e-3.
_TP = dict(head="prompt", epochs=10, lr=2e-3, batch_size=1024, weight_decay=0.0)

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
            **_PROTO,
        ),
        Method(
            "ceiling-lp", "strong ceiling: linear probe on ground truth", loss="hard", targets="truth", **_LP
        ),
        Method("naive-lp", "linear probe, cross-entropy to softmax(weak)", loss="soft", **_LP),
        Method("kd-lp", "linear probe, KD from the weak logits", loss="kd", **_LP),
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
            "ceiling-tp", "strong ceiling: text prompt on ground truth", loss="hard", targets="truth", **_TP
        ),
    ]
}


def get_method(name: str) -> Method:
    """The method registered as `name`, or a UserError listing the valid names."""
    from cpl_cache.errors import UserError

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
