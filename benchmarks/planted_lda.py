"""How far a linear classifier can get on a planted cache: LDA (class means and one shared covariance,
the classifier matched to the planted story) fit on clipart-size train rows, from ground truth and from
the weak labels' argmax, at the current defaults and at the earlier ones (isotropic noise 5.0, nuisance
6.0). A weak-label LDA below the weak model means no probe trained on weak labels should be expected to
beat it on that cache.

    python benchmarks/planted_lda.py    # writes bench-results/planted-lda.json
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch.nn.functional as F
from bench_train import DOMAINNET

from cpl_cache.cache import load_domain
from cpl_cache.synth.planted import PlantedConfig, lda, write_planted_cache

# clipart's train list, and half its test list as test (bench_train's split); hold is not read here
CLIPART = PlantedConfig(
    domain="clipart", n_train=DOMAINNET["clipart"][0], n_hold=100, n_test=DOMAINNET["clipart"][1] // 2,
    dim=512, classes=345,
)  # fmt: skip
SETTINGS = {"current": {}, "earlier": {"image_noise": 5.0, "nuisance_noise": 6.0}}


def main() -> None:
    report = {}
    for name, change in SETTINGS.items():
        cfg = dataclasses.replace(CLIPART, **change)
        with tempfile.TemporaryDirectory() as tmp:
            write_planted_cache(tmp, cfg)
            d = load_domain(tmp, "clipart")
        x = F.normalize(d.image_embeds.double(), dim=1)
        train, test = d.rows("train"), d.rows("test")
        y_test = d.labels[test].long()
        row = {"image_noise": cfg.image_noise, "nuisance_noise": cfg.nuisance_noise}
        row["weak"] = (d.weak_logits[test].argmax(1) == y_test).double().mean().item()
        for source, labels in (("truth", d.labels[train].long()), ("weak", d.weak_logits[train].argmax(1))):
            w, b = lda(x[train], labels, cfg.classes)
            row[f"lda_{source}"] = ((x[test] @ w.T + b).argmax(1) == y_test).double().mean().item()
        report[name] = row
        print(f"{name:8s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    out = Path("bench-results/planted-lda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
