"""The grid runner: grid files, skipping finished cells, recomputing stale ones, subsets, refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cpl_cache import pipeline
from cpl_cache.cli import app
from cpl_cache.errors import UserError
from cpl_cache.pipeline import MethodSpec, PipelineConfig, load_grid, parse_grid, plan, run_pipeline
from cpl_cache.synth.planted import PlantedConfig, write_planted_cache
from cpl_cache.train.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
GRID = """
domains = ["clipart", "sketch"]
seeds = [0, 1]
methods = [
    "weak",
    "cpl",
    { method = "naive-lp", epochs = 2 },
    "ceiling",
]
"""


def plant(cache: Path, domain: str, seed: int = 0) -> None:
    cfg = PlantedConfig(domain=domain, n_train=60, n_hold=20, n_test=40, dim=16, classes=5, seed=seed)
    write_planted_cache(cache, cfg, overwrite=True)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch) -> tuple[PipelineConfig, list]:
    """Two planted domains, a grid file, and a log of every training call."""
    cache = tmp_path / "cache"
    for domain in ("clipart", "sketch"):
        plant(cache, domain)
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    calls: list = []
    trainer = pipeline._trainer()
    real = trainer.train_cells

    def counting(cells, data, out, done=None):
        domain = data.data.manifest["domain"]
        calls.extend((domain, c.method.name, c.seed, isinstance(data, trainer.DomainTensors)) for c in cells)
        return real(cells, data, out, done)

    monkeypatch.setattr(trainer, "train_cells", counting)
    cfg = PipelineConfig(
        pipeline=grid, cache_dir=cache, results=tmp_path / "results", device="cpu", progress=False
    )
    return cfg, calls


def test_table2_grid_is_the_papers_and_every_method_is_registered() -> None:
    grid = load_grid(REPO / "pipelines" / "table2.toml")
    assert grid.domains == ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    assert grid.seeds == (0, 1, 2)
    assert [m.method for m in grid.methods] == [
        "weak", "zeroshot", "naive-lp", "kd-lp", "auxconf-lp", "augconf-lp", "adaptconf-lp",
        "naive-tp", "kd-tp", "auxconf-tp", "cpl", "ceiling", "ceiling-tp",
    ]  # fmt: skip
    assert len(grid.cells()) == 6 * 13 * 3


def test_a_method_joins_by_one_line(tmp_path: Path) -> None:
    text = (REPO / "pipelines" / "table2.toml").read_text()
    grown = text.replace('    "cpl", ', '    "ceiling-lp",\n    "cpl", ', 1)
    assert grown != text
    path = tmp_path / "g.toml"
    path.write_text(grown)
    assert [m.method for m in load_grid(path).methods][-4:] == ["ceiling-lp", "cpl", "ceiling", "ceiling-tp"]


def test_inline_tables_cells_and_defaults_merge() -> None:
    data = {
        "domains": ["real"],
        "seeds": [0],
        "defaults": {"epochs": 3},
        "methods": ["weak", {"method": "cpl", "lr": 0.01}],
        "cell": [{"method": "kd-lp", "epochs": 7, "head": "proto"}],
    }
    grid = parse_grid(data)
    specs = {m.method: m for m in grid.methods}
    assert specs["kd-lp"] == MethodSpec("kd-lp", (("epochs", 7), ("head", "proto")))
    assert grid.settings(specs["cpl"], METHODS) == {"epochs": 3, "lr": 0.01}
    assert grid.settings(specs["kd-lp"], METHODS) == {"epochs": 7, "head": "proto"}
    assert grid.settings(specs["weak"], METHODS) == {}  # weak trains nothing: no defaults for it


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"domains": ["real"], "seeds": [0], "methods": ["cpl", "nope"]},
            "unknown method 'nope'; valid methods: weak",
        ),
        (
            {"domains": ["real"], "seeds": [0], "methods": [{"method": "cpl", "epoch": 3}]},
            "unknown setting.*epoch",
        ),
        ({"domains": ["real"], "seeds": [0], "methods": [{"method": "cpl", "seed": 3}]}, "may override head"),
        ({"domains": ["real"], "seeds": [-1], "methods": ["cpl"]}, "integers >= 0"),
        ({"domains": ["real"], "seeds": [0, 0], "methods": ["cpl"]}, "twice"),
        ({"domains": "real", "seeds": [0], "methods": ["cpl"]}, "non-empty list"),
        ({"seeds": [0], "methods": ["cpl"]}, "`domains` is missing"),
        ({"domains": ["real"], "seeds": [0], "methods": []}, "no methods"),
        ({"domains": ["real"], "seeds": [0], "methods": ["cpl", "cpl"]}, "listed twice"),
        ({"domains": ["real"], "seeds": [0], "method": ["cpl"]}, "unknown key"),
        ({"domains": ["real"], "seeds": [0], "methods": [3]}, "a method entry"),
    ],
)
def test_bad_grids_are_refused(data: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        parse_grid(data)


def test_bad_grid_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="grid file .*none.toml not found; pass a TOML grid"):
        load_grid(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('domains = ["real"\nseeds = [0]\n')
    with pytest.raises(UserError, match="not valid TOML"):
        load_grid(bad)


def test_a_grid_may_set_every_registered_hyperparameter_and_loss_constant() -> None:
    from cpl_cache.train.losses import LOSSES
    from cpl_cache.train.methods import HPARAMS, loss_constants

    keys = set(pipeline.grid_keys())
    assert set(HPARAMS) <= keys and {"alpha", "warmup", "beta", "ramp", "tau", "T"} <= keys
    assert all(set(loss_constants(name)) <= keys for name in LOSSES)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{ method = "cpl", epochs = "three" }', "epochs must be an integer >= 0"),
        ('{ method = "cpl", epochs = 2.5 }', "epochs must be an integer"),
        ('{ method = "cpl", epochs = true }', "epochs must be an integer"),
        ('{ method = "cpl", lr = "0.1" }', "lr must be a number > 0"),
        ('{ method = "cpl", lr = 0 }', "lr must be a number > 0"),
        ('{ method = "adaptconf-lp", tau = "x" }', "tau must be a number"),
        ('{ method = "cpl", tau = 4.0 }', "unknown setting.*tau.*cpl with loss kd takes.*T"),
    ],
)
def test_settings_of_the_wrong_type_are_refused_before_any_training(setup, tmp_path: Path, line, match):
    cfg, calls = setup
    grid = tmp_path / "typed.toml"
    grid.write_text(GRID.replace('"cpl",', line + ","))
    with pytest.raises(UserError, match=match):
        run_pipeline(PipelineConfig(**{**cfg.__dict__, "pipeline": grid}))
    assert calls == [] and not cfg.results.exists()


def test_python_310_without_tomli_is_told_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(UserError, match="pip install tomli"):
        pipeline._toml_loads("seeds = [0]")


def test_run_trains_every_cell_once_and_skips_them_after(setup) -> None:
    cfg, calls = setup
    summary = run_pipeline(cfg)
    assert (summary.cells, summary.ran, summary.skipped) == (16, 16, 0)
    # domain-major; the cache is handed to every cell; an override shows in the run's name
    assert calls[0] == ("clipart", "weak", 0, True) and calls[8][0] == "sketch"
    assert all(c[3] for c in calls)
    rec = json.loads((cfg.results / "sketch" / "naive-lp+epochs=2-seed1.json").read_text())
    assert rec["hparams"]["epochs"] == 2 and rec["seed"] == 1
    assert len(list(cfg.results.glob("*/*.json"))) == 16

    calls.clear()
    summary = run_pipeline(cfg)
    assert (summary.ran, summary.skipped, calls) == (0, 16, [])
    assert "16 already done" in summary.line()


def test_stale_results_are_recomputed(setup, capsys) -> None:
    cfg, calls = setup
    run_pipeline(cfg)
    calls.clear()
    plant(cfg.cache_dir, "sketch", seed=5)  # another cache of sketch: its results are stale
    broken = cfg.results / "clipart" / "cpl-seed0.json"
    broken.write_text("{")
    changed = cfg.results / "clipart" / "ceiling-seed1.json"
    rec = json.loads(changed.read_text())
    rec["hparams"]["lr"] = 0.5  # as if the method's default had changed since
    changed.write_text(json.dumps(rec))

    summary = run_pipeline(cfg)
    assert summary.ran == 10 and summary.skipped == 6
    assert sorted(c[:3] for c in calls if c[0] == "clipart") == [
        ("clipart", "ceiling", 1),
        ("clipart", "cpl", 0),
    ]
    assert len([c for c in calls if c[0] == "sketch"]) == 8
    err = capsys.readouterr().err
    assert "recomputing sketch/cpl-seed0: it came from another cache" in err
    assert "recomputing clipart/cpl-seed0: the file is unreadable" in err
    assert "recomputing clipart/ceiling-seed1: it was run with other hyperparameters" in err
    assert json.loads(broken.read_text())["metrics"]["test_acc"] >= 0


def test_subsets_of_the_grid(setup) -> None:
    cfg, calls = setup
    sub = PipelineConfig(
        **{**cfg.__dict__, "seeds": (1,), "methods": ("naive-lp", "cpl"), "domains": ("sketch",)}
    )
    summary = run_pipeline(sub)
    assert summary.cells == 2 and sorted(c[1] for c in calls) == ["cpl", "naive-lp"]
    # naive-lp keeps its grid line (epochs = 2); a method the grid does not list is refused (below)
    assert sorted(p.name for p in (cfg.results / "sketch").iterdir()) == [
        "cpl-seed1.json", "naive-lp+epochs=2-seed1.json"
    ]  # fmt: skip
    with pytest.raises(UserError, match="--methods zeroshot: not in the grid"):
        run_pipeline(PipelineConfig(**{**cfg.__dict__, "methods": ("zeroshot",)}))
    with pytest.raises(UserError, match="unknown method 'cpll' in --methods"):
        run_pipeline(PipelineConfig(**{**cfg.__dict__, "methods": ("cpll",)}))


def test_table_from_a_run_equals_the_mean_of_its_files(setup) -> None:
    from cpl_cache.report import build_table, load_results

    cfg, _ = setup
    run_pipeline(cfg)
    rows = {r["method"]: r for r in build_table(load_results(cfg.results))["rows"]}
    for d in ("clipart", "sketch"):
        accs = [
            json.loads((cfg.results / d / f"cpl-seed{s}.json").read_text())["metrics"]["test_acc"]
            for s in (0, 1)
        ]
        assert rows["cpl"]["cells"][d]["mean"] == pytest.approx(100 * np.mean(accs))


def test_missing_domain_fails_before_any_training(setup, tmp_path: Path) -> None:
    cfg, calls = setup
    grid = tmp_path / "with-real.toml"
    grid.write_text(GRID.replace('domains = ["clipart", "sketch"]', 'domains = ["clipart", "real"]'))
    sub = PipelineConfig(**{**cfg.__dict__, "pipeline": grid})
    with pytest.raises(UserError, match=r"no cache of real .*cpl-cache extract.*--domains clipart"):
        run_pipeline(sub)
    assert calls == [] and not cfg.results.exists()


def test_bad_settings_fail_before_any_training(setup, tmp_path: Path) -> None:
    cfg, calls = setup
    grid = tmp_path / "g2.toml"
    grid.write_text(GRID.replace('"weak",', '{ method = "weak", epochs = 3 },'))
    with pytest.raises(UserError, match="method 'weak'.*trains nothing"):
        run_pipeline(PipelineConfig(**{**cfg.__dict__, "pipeline": grid}))
    same = METHODS["cpl"].epochs  # the default spelled out: the same run as plain "cpl"
    grid.write_text(GRID.replace('"cpl",', f'"cpl", {{ method = "cpl", epochs = {same} }},'))
    with pytest.raises(UserError, match="both run as 'cpl'"):
        run_pipeline(PipelineConfig(**{**cfg.__dict__, "pipeline": grid}))
    assert calls == []


def test_run_command(setup) -> None:
    cfg, _ = setup
    args = ["run", str(cfg.pipeline), "--cache-dir", str(cfg.cache_dir), "--results", str(cfg.results)]
    res = CliRunner().invoke(
        app, [*args, "--device", "cpu", "--seeds", "0", "--methods", "weak,cpl", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert "4 cell(s): 4 trained, 0 already done" in res.output
    res = CliRunner().invoke(app, [*args, "--seeds", "0,x"])
    assert res.exit_code == 2 and "--seeds" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, [*args, "--domains", "real"])  # not in the grid: nothing to restrict to
    assert res.exit_code == 2 and "not in the grid" in res.output and "clipart, sketch" in res.output


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--seeds", "5", "--seeds 5: not in the grid, which lists 0, 1"),
        ("--seeds", "0,0", "--seeds names 0 more than once"),
        ("--methods", "kd-lp", "--methods kd-lp: not in the grid"),
        ("--domains", "clipart,clipart", "--domains names clipart more than once"),
    ],
)
def test_run_subsets_only_restrict_the_grid(setup, option: str, value: str, needle: str) -> None:
    """`--seeds 5` and `--methods kd-lp` added cells the grid does not list, which the table then averaged
    in; `--seeds 0,0` was accepted. Each is one line now, and nothing is trained."""
    cfg, _ = setup
    args = ["run", str(cfg.pipeline), "--cache-dir", str(cfg.cache_dir), "--results", str(cfg.results)]
    res = CliRunner().invoke(app, [*args, "--device", "cpu", option, value, "--no-progress"])
    assert res.exit_code == 2, res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_a_default_loss_constant_reaches_only_the_losses_that_take_it(setup, tmp_path: Path) -> None:
    """`[defaults] tau = 0.7` failed for every method whose loss has no tau; a typo still fails."""
    cfg, _ = setup
    grid = tmp_path / "tau.toml"
    grid.write_text(
        'domains = ["clipart"]\nseeds = [0]\nmethods = ["cpl", "adaptconf-lp"]\n[defaults]\ntau = 0.7\n'
    )
    cells = {c.cell.method.name: c.cell for c in plan(PipelineConfig(**{**cfg.__dict__, "pipeline": grid}))}
    assert cells["adaptconf-lp"].hparams["loss_args"]["tau"] == 0.7 and cells["adaptconf-lp"].name.endswith(
        "tau=0.7"
    )
    assert "tau" not in cells["cpl"].hparams["loss_args"] and cells["cpl"].name == "cpl"
    grid.write_text(grid.read_text().replace("tau = 0.7", "taau = 0.7"))
    with pytest.raises(UserError, match="unknown setting.*taau"):
        plan(PipelineConfig(**{**cfg.__dict__, "pipeline": grid}))


def test_two_runs_on_one_results_folder_never_train_the_same_cell(setup) -> None:
    """A cell claimed by a live process is left to it and said so; a stale claim (its process is gone)
    is taken over; a killed run's temporary file is removed; the claims are released."""
    import os
    import subprocess
    import sys

    from cpl_cache import claims

    cfg, calls = setup
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    live = cfg.results / "clipart" / "cpl-seed0.json"
    stale = cfg.results / "clipart" / "cpl-seed1.json"
    for path, pid in ((live, os.getppid()), (stale, dead_pid)):
        claims.lock_path(path).parent.mkdir(parents=True, exist_ok=True)
        claims.lock_path(path).write_text(str(pid))
    leftover = cfg.results / "clipart" / f".weak-seed0.json.tmp-{dead_pid}"
    leftover.write_text("{partial")
    summary = run_pipeline(cfg)
    assert summary.claimed == 1 and "left to another run" in summary.line()
    assert not live.exists() and stale.exists() and summary.ran == summary.cells - 1
    assert not leftover.exists() and claims.lock_path(live).read_text() == str(os.getppid())
    assert not claims.lock_path(stale).exists()  # taken over, then released
    claims.lock_path(live).unlink()
    assert run_pipeline(cfg).ran == 1  # the cell the other run held, now free
