"""Table 2's methods on the independent mixture cache (`MixtureConfig`: 3,000 train rows, 64-d, 20
classes), three caches (seeds 0, 1, 2, each trained with its own seed), the registry's defaults: once
at the logit scale a CLIP would learn for the cache's geometry (the default, `calibrated_scale`) and
once at OpenAI's 100, which that geometry makes far sharper than the weak logits. Also the calibrated
scale of the planted caches' geometry, against the 100 they are written with.

    python benchmarks/mixture_table.py    # writes bench-results/mixture.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from cpl_cache.cache import load_domain
from cpl_cache.synth.planted import (
    LOGIT_SCALE,
    MixtureConfig,
    PlantedConfig,
    calibrated_scale,
    write_mixture_cache,
    write_planted_cache,
)
from cpl_cache.train.trainer import Cell, DomainTensors, TrainConfig, train_cells

METHODS = [
    "weak", "zeroshot", "naive-lp", "auxconf-lp", "augconf-lp", "adaptconf-lp", "cpl",
    "ceiling-lp", "ceiling",
]  # fmt: skip
DOMAIN = "clipart"
VARIANTS = [("calibrated", None, "none"), ("kappa100", LOGIT_SCALE, "none"), ("select", None, "weak")]


def mixture_accuracies(
    root: Path, seed: int, logit_scale: float | None, select: str
) -> tuple[float, dict[str, float]]:
    cache = root / f"mixture-{seed}-{logit_scale}"
    if not cache.exists():
        write_mixture_cache(cache, MixtureConfig(domain=DOMAIN, seed=seed, logit_scale=logit_scale))
    data = load_domain(cache, DOMAIN)
    cells = [Cell.of(TrainConfig(m, DOMAIN, cache, seed=seed, device="cpu", select=select)) for m in METHODS]
    records = train_cells(cells, DomainTensors(data, "cpu"), root / f"out-{seed}-{logit_scale}-{select}")
    return data.logit_scale, {r["base_method"]: 100 * r["metrics"]["test_acc"] for r in records}


def planted_scale(seed: int) -> float:
    """The calibrated scale of the planted story at DomainNet's shape (512-d, 345 classes)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PlantedConfig(domain=DOMAIN, n_train=10_000, n_hold=1, n_test=1, seed=seed)
        write_planted_cache(tmp, cfg)
        dt = DomainTensors(load_domain(Path(tmp), DOMAIN), "cpu")
        cos = (dt.x_train @ dt.data.text_embeds.T).numpy()
        return calibrated_scale(cos, dt.data.labels[dt.train].numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parents[1] / "bench-results/mixture.json"
    )
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict = {"cache": {**MixtureConfig().__dict__, "domain": DOMAIN}, "seeds": seeds, "methods": METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for key, scale, select in VARIANTS:
            runs = [mixture_accuracies(Path(tmp), s, scale, select) for s in seeds]
            out[key] = {
                "logit_scale": [k for k, _ in runs],
                "mean": {m: statistics.mean(a[m] for _, a in runs) for m in METHODS},
                "std": {
                    m: statistics.stdev(a[m] for _, a in runs) if len(runs) > 1 else 0.0 for m in METHODS
                },
                "per_seed": [a for _, a in runs],
            }
    out["planted_calibrated_scale"] = [planted_scale(s) for s in seeds]
    print("| method | calibrated kappa | kappa 100 | calibrated, --select |")
    print("| --- | ---: | ---: | ---: |")
    for m in METHODS:
        row = [f"{out[k]['mean'][m]:.1f} ± {out[k]['std'][m]:.1f}" for k, _, _ in VARIANTS]
        print(f"| {m} | " + " | ".join(row) + " |")
    print("mixture calibrated scales:", ", ".join(f"{k:.2f}" for k in out["calibrated"]["logit_scale"]))
    print(
        "planted calibrated scales (written at 100):",
        ", ".join(f"{k:.1f}" for k in out["planted_calibrated_scale"]),
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
