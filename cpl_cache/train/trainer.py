"""Stage two: train one head with one loss from the cached tensors, evaluate, write the results JSON.

    cpl-cache train --method cpl --domain quickdraw --cache-dir cache
    cpl-cache train --method naive-lp --domain quickdraw --cache-dir cache --loss adaptconf --epochs 5

    from cpl_cache.train.trainer import TrainConfig, run_training
    record = run_training(TrainConfig(method="cpl", domain="quickdraw", cache_dir=Path("cache")))

The whole split lives on the device as tensors: embeddings normalised once to float32, targets (weak
logits, or ground truth for the ceilings) gathered once. A batch is a slice of a seeded permutation;
there is no DataLoader, no per-step host sync, and the only per-step Python is the loop below.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.adamw import adamw

from cpl_cache.errors import UserError
from cpl_cache.train import cpu_kernel
from cpl_cache.train.heads import PROMPT_INIT, get_head
from cpl_cache.train.losses import LOGIT_GRADS, Loss, get_loss
from cpl_cache.train.methods import Method, get_method

if TYPE_CHECKING:
    from cpl_cache.cache import CachedDomain

TRUTH_OFF = -1e4  # ground truth as logits: 0 on the true class, this elsewhere; softmax reads it as one-hot
EVAL_CHUNK = 16384  # rows per forward pass when evaluating (bounds memory on large splits)
# Train accuracy (agreement with the weak argmax), in the curve and in `metrics`, is measured on this many
# fixed random train rows: an estimate within about half a point, at a tenth of a full pass on quickdraw.
CURVE_TRAIN_ROWS = 8192


@dataclass(frozen=True)
class TrainConfig:
    """One stage-two run; None means the method's default from `METHODS`."""

    method: str
    domain: str
    cache_dir: Path
    out: Path = Path("results")
    seed: int = 0
    head: str | None = None
    loss: str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    device: str = "auto"


@dataclass(frozen=True)
class Hparams:
    """What one run actually uses: the method's defaults with the config's overrides applied."""

    head: str | None
    loss: str | None
    targets: str | None
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    curve_points: int
    optimizer: str = "adamw"
    schedule: str = "cosine"


def result_path(out: Path, domain: str, method: str, seed: int) -> Path:
    """Where a run's record lives: `out/domain/{method}-seed{seed}.json`."""
    return Path(out) / domain / f"{method}-seed{seed}.json"


def resolve(cfg: TrainConfig) -> tuple[Method, Hparams, str]:
    """The method, its hyperparameters with overrides, and the run's name.

    The name is the method's, followed by `+key=value` for each override that differs from the
    method's default (e.g. `cpl+loss=soft`, `naive-lp+head=proto+epochs=3`), so that an ablation
    never overwrites the plain method's results.
    """
    m = get_method(cfg.method)
    overrides = {
        "head": cfg.head,
        "loss": cfg.loss,
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "batch": cfg.batch_size,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if not m.trains and given:
        raise UserError(
            f"method {m.name!r} trains nothing, so --{'/--'.join(given)} do not apply; "
            "pick a method that trains (see `cpl-cache methods`)"
        )
    if cfg.head is not None:
        get_head(cfg.head)
    if cfg.loss is not None:
        get_loss(cfg.loss)
    if cfg.epochs is not None and cfg.epochs < 0:
        raise UserError(f"--epochs must be 0 or more, got {cfg.epochs}")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, got {cfg.batch_size}")
    hp = Hparams(
        head=cfg.head or m.head,
        loss=cfg.loss or m.loss,
        targets=m.targets,
        epochs=m.epochs if cfg.epochs is None else cfg.epochs,
        lr=m.lr if cfg.lr is None else cfg.lr,
        batch_size=m.batch_size if cfg.batch_size is None else cfg.batch_size,
        weight_decay=m.weight_decay,
        curve_points=m.curve_points,
    )
    defaults = {"head": m.head, "loss": m.loss, "epochs": m.epochs, "lr": m.lr, "batch": m.batch_size}
    name = m.name + "".join(
        f"+{k}={v:g}" if isinstance(v, float) else f"+{k}={v}" for k, v in given.items() if v != defaults[k]
    )
    return m, hp, name


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


@dataclass(frozen=True)
class Targets:
    """What a run trains against, per train row: logits (N, K) for a loss differentiated by autograd,
    and their softmax and argmax for a loss's closed-form gradient (`LOGIT_GRADS`)."""

    logits: Tensor
    probs: Tensor
    top: Tensor

    @classmethod
    def of(cls, logits: Tensor) -> Targets:
        return cls(logits, F.softmax(logits, dim=1), logits.argmax(dim=1))


class DomainTensors:
    """One domain's tensors on one device, made once and shared by every run on it.

    A grid trains about ten methods per domain; each part here (normalised embeddings, the targets'
    softmax and argmax, the checks of the cache) is computed on first use and then reused.
    """

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
    def weak_targets(self) -> Targets:
        return Targets.of(self.data.weak_logits.index_select(0, self.train).to(self.device))

    @cached_property
    def truth_targets(self) -> Targets:
        """Ground truth of the train rows as logits: 0 on the true class, TRUTH_OFF elsewhere."""
        y = self.data.labels[self.train].to(self.device)
        K = self.data.num_classes
        if bool((y < 0).any() or (y >= K).any()):
            raise UserError(f"train labels of {self.where} fall outside 0..{K - 1}; re-extract the cache")
        return Targets.of(torch.full((len(y), K), TRUTH_OFF, device=self.device).scatter_(1, y[:, None], 0.0))


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """One epoch's row order: a seeded permutation of range(n), cut into batches of `batch_size`, each
    batch's rows in ascending order.

    Sorting within a batch changes no batch, only the order its rows are gathered in (a batch's
    gradient is a sum over its rows: the same up to rounding). Rows gathered in memory order come in
    8-10% faster on a CPU (the embeddings' rows at quickdraw size on 2 cores: 0.53-0.59 against
    0.57-0.65 ms a step, medians over steps in two runs), about 1% of a step.
    """
    perm = torch.randperm(n, generator=generator).numpy()
    full = n - n % batch_size
    # numpy's sort: 1.2 ms for quickdraw's 118 batches of 1024, where torch's takes 5 (2-core CPU)
    batches = np.sort(perm[:full].reshape(-1, batch_size), axis=1).reshape(-1)
    return torch.from_numpy(np.concatenate([batches, np.sort(perm[full:])]))


@torch.no_grad()
def predict(head: nn.Module, x: Tensor) -> Tensor:
    """Argmax class of every row, a chunk at a time."""
    return torch.cat([head(x[i : i + EVAL_CHUNK]).argmax(dim=1) for i in range(0, len(x), EVAL_CHUNK)])


class AdamW:
    """`torch.optim.AdamW`'s update (decoupled weight decay, bias correction, default betas and eps) as one
    call of torch's fused kernel per step where the device has it (else the functional `adamw`): the
    arithmetic of `torch.optim.AdamW(fused=True)`, bit for bit, without the optimiser object's per-step
    bookkeeping (hooks, state look-ups, group loops: about 0.1 ms of a 6 ms step on a 2-core CPU).
    Parameters that do not require a gradient (the prompt head's frozen text tower) are left out."""

    def __init__(
        self,
        params: Any,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        # None: the fused kernel wherever the parameters' device has it (the CPU and CUDA).
        self.fused = all(p.device.type in ("cpu", "cuda") for p in self.params) if fused is None else fused
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        # The fused kernel keeps its step counts on the parameters' device, as torch.optim.AdamW does.
        self.steps = [torch.zeros((), device=p.device if self.fused else "cpu") for p in self.params]
        self.direct = self.fused and len({(p.device, p.dtype) for p in self.params}) == 1

    @torch.no_grad()
    def step(self, grads: list[Tensor], lr: float) -> None:
        # `grads` must be contiguous, like their parameters: torch's fused CPU kernel reads a strided
        # gradient (a column slice, say) as if it were contiguous and steps wrongly, without an error.
        if self.direct:
            # What the functional `adamw` runs when fused, less its grouping of the tensors by device and
            # dtype (here there is one group): 0.37 against 0.48 ms a step at K = 345, D = 512 on 2 cores
            # (medians over steps run after the matrix products, as in training).
            torch._foreach_add_(self.steps, 1)
            torch._fused_adamw_(
                self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, lr=lr,
                beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay, eps=self.eps,
                amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
            )  # fmt: skip
            return
        adamw(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps,
            fused=self.fused or None, amsgrad=False, beta1=self.betas[0], beta2=self.betas[1],
            lr=lr, weight_decay=self.weight_decay, eps=self.eps, maximize=False,
        )  # fmt: skip


def fit(
    head: nn.Module,
    loss_fn: Loss,
    x: Tensor,
    targets: Targets,
    hp: Hparams,
    generator: torch.Generator,
    evaluate: Any = None,
    *,
    closed_form: bool = True,
) -> list[dict[str, Any]]:
    """Train `head` on rows `x` (N, D) against `targets`: AdamW, cosine schedule to zero.

    `evaluate(step)` is called at `hp.curve_points + 1` fixed steps (0 and the last included) and
    its records are the curve. Batches are slices of one seeded order per epoch (`batch_order`), gathered
    into buffers reused across steps. No step synchronises with the device: the loss is never read back.

    Where the loss has a closed-form gradient in the logits (`LOGIT_GRADS`; all registered losses do)
    and the head one in its parameters (`closed_form`: the proto and linear heads), a step is plain
    tensor code: logits, their gradient from the targets' softmax and argmax (computed once per
    domain; on the CPU in float32, by `cpu_kernel` where it builds), the parameters' gradients, AdamW;
    no autograd graph is built. Otherwise (the prompt head, a loss registered with other constants,
    or `closed_form=False`) autograd differentiates the loss: the same steps up to rounding (a test
    compares)."""
    n, bs = len(x), min(hp.batch_size, len(x))
    per_epoch = math.ceil(n / bs)
    total = hp.epochs * per_epoch
    at = {round(i * total / hp.curve_points) for i in range(hp.curve_points + 1)} if total else {0}
    grad_fn = LOGIT_GRADS.get(loss_fn) if closed_form else None
    head_form = getattr(head, "closed_form", None) if grad_fn is not None else None
    opt = AdamW(head.parameters(), hp.weight_decay)
    params = opt.params
    # On the CPU in float32 a form runs as cpu_kernel.c: one pass per row, the targets read in place.
    kernel = (
        grad_fn is not None
        and x.device.type == "cpu"
        and x.dtype == targets.probs.dtype == torch.float32
        and all(p.dtype == torch.float32 for p in params)
        and cpu_kernel.available()
    )
    # Each step's rows land in the same buffers: fresh (B, D) and (B, K) tensors every step cost page faults.
    x_buf = x.new_empty(bs, x.shape[1])
    gathers_probs = grad_fn is not None and grad_fn.probs and not kernel
    probs_buf = targets.probs.new_empty(bs, targets.probs.shape[1]) if gathers_probs else None

    def logit_grad(s: Tensor, idx: Tensor, progress: float) -> Tensor:
        """The form's gradient at logits s (overwritten) for train rows idx: B * d loss / d s."""
        if kernel:
            probs, top = targets.probs if grad_fn.probs else None, targets.top if grad_fn.top else None
            return cpu_kernel.logit_grad_(s, probs, top, idx, *grad_fn.kernel(progress))
        # The targets' softmax and argmax rows the form reads (the ceilings' hard loss: no probs).
        probs = (
            torch.index_select(targets.probs, 0, idx, out=probs_buf[: len(idx)]) if grad_fn.probs else None
        )
        return grad_fn(s, probs, targets.top.index_select(0, idx) if grad_fn.top else None, progress)

    def autograd_grads(backward: Callable[[], None]) -> list[Tensor]:
        with torch.enable_grad():
            for p in params:
                p.grad = None
            backward()
        return [p.grad for p in params]

    if grad_fn is None:  # autograd through the loss

        def grads_of(xb: Tensor, idx: Tensor, progress: float) -> list[Tensor]:
            w = targets.logits.index_select(0, idx)
            return autograd_grads(lambda: loss_fn(head(xb), w, progress).backward())

    elif head_form is not None:  # closed form end to end: no autograd graph

        def grads_of(xb: Tensor, idx: Tensor, progress: float) -> list[Tensor]:
            logits, backward = head_form(xb)
            return list(backward(logit_grad(logits, idx, progress), 1.0 / len(idx)))

    else:  # closed form in the logits, autograd through the head (the prompt head)

        def grads_of(xb: Tensor, idx: Tensor, progress: float) -> list[Tensor]:
            def backward() -> None:
                logits = head(xb)
                # A form may overwrite its logits, and autograd may hold these: it gets a copy.
                logits.backward(logit_grad(logits.detach().clone(), idx, progress).div_(len(idx)))

            return autograd_grads(backward)

    curve = []
    with torch.no_grad():
        for step in range(total):
            if evaluate is not None and step in at:
                curve.append(evaluate(step))
            i = step % per_epoch
            if i == 0:  # a fresh order per epoch, drawn on the CPU so every device sees the same one
                perm = batch_order(n, bs, generator).to(x.device)
            idx = perm[i * bs : (i + 1) * bs]
            xb = torch.index_select(x, 0, idx, out=x_buf[: len(idx)])
            opt.step(grads_of(xb, idx, step / total), hp.lr * 0.5 * (1.0 + math.cos(math.pi * step / total)))
    if evaluate is not None:
        curve.append(evaluate(total))
    return curve


def run_training(cfg: TrainConfig, data: CachedDomain | DomainTensors | None = None) -> dict[str, Any]:
    """Train one method, write its results JSON atomically and return it.

    `data` is the domain's cache, loaded unless given, or its `DomainTensors` on the run's device,
    which runs on the same domain share (as `cpl-cache run` does).
    """
    from cpl_cache.cache import atomic_write_text, domain_dir, load_domain
    from cpl_cache.runtime import resolve_device, seed_everything

    method, hp, name = resolve(cfg)
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
    if method.trains and hp.epochs > 0 and len(dt.train) == 0:
        raise UserError(f"{dt.where} has no train rows to train on; extract the domain's train list too")
    if device == "cpu":
        # Softmax of confident logits and Adam's squared gradients underflow to subnormal floats, which
        # x86 CPUs process tens of times slower; flushing them to zero changes no result that matters.
        torch.set_flush_denormal(True)
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()

    y_test, weak_test = dt.y_test, dt.weak_test
    curve: list[dict[str, Any]] = []
    head_config: dict[str, Any] | None = None
    if hp.head is None:  # the weak supervisor itself
        pred_test, train_acc = weak_test, 1.0
    else:
        x_train, x_test = dt.x_train, dt.x_test
        head = get_head(hp.head)(cache, gen).to(device)
        if hp.head == "prompt":  # how the context was set up; fixed per head, so not part of `hparams`
            head_config = {"n_ctx": head.n_ctx, "init": PROMPT_INIT}
        probe = torch.randperm(len(dt.train), generator=gen)[:CURVE_TRAIN_ROWS]
        x_probe = x_train[probe.to(device)]
        weak_probe = cache.weak_logits[dt.train[probe]].argmax(dim=1).to(device)
        last: dict[str, Tensor] = {}

        def evaluate(step: int) -> dict[str, Any]:
            last["pred_test"] = predict(head, x_test)
            agree = (predict(head, x_probe) == weak_probe).float().mean().item() if len(probe) else None
            return {
                "step": step,
                "train_acc": agree,
                "test_acc": (last["pred_test"] == y_test).float().mean().item(),
            }

        if method.trains and hp.epochs > 0:
            targets = dt.truth_targets if method.uses_ground_truth else dt.weak_targets
            curve = fit(head, get_loss(hp.loss), x_train, targets, hp, gen, evaluate)
            final = curve[-1]
        else:
            final = evaluate(0)
        pred_test, train_acc = last["pred_test"], final["train_acc"]

    metrics = {
        "test_acc": (pred_test == y_test).float().mean().item(),
        "weak_agreement": (pred_test == weak_test).float().mean().item(),
        "train_acc": train_acc,
    }
    record = {
        "domain": cfg.domain,
        "method": name,
        "base_method": method.name,
        "head": hp.head,
        "loss": hp.loss,
        "seed": cfg.seed,
        "hparams": asdict(hp),
        **({"head_config": head_config} if head_config is not None else {}),
        "metrics": metrics,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
        "device": device,
        # Whether the CPU kernels stepped this run (else torch's operations): equal up to float32 rounding.
        "cpu_kernel": device == "cpu" and cpu_kernel.available(),
        "cache": cache.identity(),
    }
    path = result_path(cfg.out, cfg.domain, name, cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    record["path"] = str(path)
    return record
