"""Run a grid of stage-two cells (domain x method x seed) from the feature cache, like Table 2.

A grid file (TOML, see `pipelines/table2.toml`) names the domains, the seeds and the methods; each
method is one line, a name or an inline table of overrides:

    dataset = "domainnet"   # optional: the image layout `reproduce` reads (cpl_cache.datasets)
    domains = ["clipart", "quickdraw"]
    seeds = [0, 1, 2]
    methods = [
        "weak",
        { method = "auxconf-lp", epochs = 20 },
    ]
    [defaults]          # optional: overrides for every method
    epochs = 10

`[[cell]]` tables (`method = ...` plus overrides) are the multi-line form of an inline entry.
Each domain's cache is loaded once and all its cells train from it. A cell whose result file exists,
came from the same cache and asked for the same overrides is skipped, so a rerun does no work.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpl_cache.cache import MANIFEST, manifest_identity, read_manifest
from cpl_cache.datasets import DATASETS
from cpl_cache.errors import UserError
from cpl_cache.runtime import check_seed


def grid_keys() -> list[str]:
    """The settings a grid line may override: every hyperparameter of the method registry and every
    registered loss's constants (a cell's own loss decides which of those apply: see `plan`)."""
    from cpl_cache.train.losses import LOSSES
    from cpl_cache.train.methods import HPARAMS, loss_constants

    return list(dict.fromkeys([*HPARAMS, *(k for name in LOSSES for k in loss_constants(name))]))


def _toml_loads(text: str) -> dict[str, Any]:
    """tomllib on Python >= 3.11, `tomli` on 3.10 when installed."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UserError(
                "reading a grid file on Python 3.10 needs the `tomli` package; `pip install tomli` "
                "or use Python 3.11+"
            ) from None
    return tomllib.loads(text)


def _trainer():
    """The stage-two module the pipeline drives (imported late: it pulls in torch)."""
    from cpl_cache.train import trainer

    return trainer


def _registry() -> Mapping[str, Any]:
    from cpl_cache.train.methods import METHODS

    return METHODS


# ------------------------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class MethodSpec:
    """One method line of a grid: the registered name and the settings it overrides."""

    method: str
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: every (domain, method, seed) is a cell; `defaults` apply to methods that train."""

    domains: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[MethodSpec, ...]
    defaults: tuple[tuple[str, Any], ...] = ()
    source: Path | None = None
    dataset: str | None = None  # the image layout the grid's domains come from; None: not stated

    def cells(self) -> list[tuple[str, MethodSpec, int]]:
        """Cells in run order: domain-major, so each domain's cache is loaded once."""
        return [(d, m, s) for d in self.domains for m in self.methods for s in self.seeds]

    def settings(self, spec: MethodSpec, registry: Mapping[str, Any]) -> dict[str, Any]:
        """The overrides a cell passes to TrainConfig: the grid's defaults (for methods that train; a
        loss constant only where the cell's loss takes it, so `tau = 0.7` reaches the AdaptConf lines
        alone), then the method line's own. A default no setting or loss knows is passed on, to be
        refused as unknown."""
        from cpl_cache.train.losses import LOSSES
        from cpl_cache.train.methods import HPARAMS, loss_constants

        method = registry.get(spec.method)
        if not getattr(method, "trains", True):
            return dict(spec.overrides)
        own, given = dict(spec.overrides), dict(self.defaults)
        loss = own.get("loss", given.get("loss", getattr(method, "loss", None)))
        anywhere = {k for name in LOSSES for k in loss_constants(name)}
        takes = set(loss_constants(loss)) if loss in LOSSES else anywhere
        defaults = {k: v for k, v in given.items() if k in HPARAMS or k in takes or k not in anywhere}
        return {**defaults, **own}


def _str_list(raw: Any, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x for x in raw):
        raise UserError(f'{where}: `{key}` must be a non-empty list of names, e.g. {key} = ["quickdraw"]')
    if len(set(raw)) != len(raw):
        raise UserError(f"{where}: `{key}` lists a name twice ({', '.join(raw)})")
    return tuple(raw)


def _seed_list(raw: Any, where: str) -> tuple[int, ...]:
    ok = isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
    if not ok or any(x < 0 for x in raw):
        raise UserError(f"{where}: `seeds` must be a non-empty list of integers >= 0, e.g. seeds = [0, 1, 2]")
    for x in raw:
        check_seed(x, f"{where}: seed")
    if len(set(raw)) != len(raw):
        raise UserError(f"{where}: `seeds` lists a seed twice ({raw})")
    return tuple(raw)


def _overrides(table: dict[str, Any], allowed: Sequence[str], where: str) -> tuple[tuple[str, Any], ...]:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise UserError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; a method may override {', '.join(allowed)}"
        )
    return tuple(sorted(table.items()))


def parse_grid(
    data: dict[str, Any],
    *,
    where: str = "grid",
    registry: Mapping[str, Any] | None = None,
    override_keys: Sequence[str] | None = None,
    source: Path | None = None,
) -> Grid:
    """Check a grid dict (as read from TOML) and turn it into a Grid; every problem is a UserError."""
    registry = _registry() if registry is None else registry
    allowed = list(grid_keys() if override_keys is None else override_keys)
    top = ("dataset", "domains", "seeds", "methods", "cell", "defaults")
    unknown = sorted(set(data) - set(top))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; a grid has {', '.join(top)}")
    for key in ("domains", "seeds"):
        if key not in data:
            raise UserError(f"{where}: `{key}` is missing; see pipelines/table2.toml for the layout")
    domains = _str_list(data["domains"], "domains", where)
    dataset = data.get("dataset")
    if dataset is not None:
        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise UserError(f"{where}: unknown dataset {dataset!r}; use one of {', '.join(sorted(DATASETS))}")
    seeds = _seed_list(data["seeds"], where)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UserError(f"{where}: `defaults` must be a table of overrides, e.g. [defaults] epochs = 10")

    methods, cells = data.get("methods", []), data.get("cell", [])
    if not isinstance(methods, list):
        raise UserError(f'{where}: `methods` must be a list, one method a line: methods = ["weak", "cpl"]')
    if not isinstance(cells, list):
        raise UserError(f"{where}: write cells as [[cell]] tables")
    entries = [*methods, *cells]
    if not entries:
        raise UserError(f'{where}: no methods; add `methods = ["cpl", ...]` or [[cell]] tables')

    specs: list[MethodSpec] = []
    for entry in entries:
        if isinstance(entry, str):
            name, table = entry, {}
        elif isinstance(entry, dict) and isinstance(entry.get("method"), str):
            table = dict(entry)
            name = table.pop("method")
        else:
            raise UserError(
                f'{where}: a method entry is a name or a table with `method = "..."`, got {entry!r}'
            )
        if name not in registry:
            raise UserError(f"{where}: unknown method {name!r}; valid methods: {', '.join(registry)}")
        spec = MethodSpec(name, _overrides(table, allowed, f"{where} method {name!r}"))
        if spec in specs:
            raise UserError(f"{where}: method {name!r} is listed twice with the same settings; keep one line")
        specs.append(spec)
    return Grid(
        domains=domains,
        seeds=seeds,
        methods=tuple(specs),
        defaults=_overrides(defaults, allowed, f"{where} [defaults]"),
        source=source,
        dataset=dataset,
    )


def load_grid(path: Path | str, registry: Mapping[str, Any] | None = None) -> Grid:
    """Read and check a grid file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file {path} not found; pass a TOML grid such as pipelines/table2.toml")
    try:
        data = _toml_loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read grid file {path} ({err})") from None
    except ValueError as err:  # tomllib.TOMLDecodeError
        raise UserError(f"{path} is not valid TOML ({err}); fix the line it names") from None
    return parse_grid(data, where=str(path), registry=registry, source=path)


def restrict(
    grid: Grid,
    *,
    domains: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    registry: Mapping[str, Any] | None = None,
) -> Grid:
    """The grid restricted to these domains, seeds or methods (e.g. a quick run), in the grid's order; a
    method keeps its grid lines. A value the grid does not list, or one given twice, is refused."""
    if methods is not None:
        registry = _registry() if registry is None else registry
        for name in methods:
            if name not in registry:
                raise UserError(f"unknown method {name!r} in --methods; valid methods: {', '.join(registry)}")
    listed = list(dict.fromkeys(m.method for m in grid.methods))
    keep = {
        what: _subset(what, asked, have)
        for what, asked, have in (("domains", domains, grid.domains), ("seeds", seeds, grid.seeds),
                                  ("methods", methods, listed))
    }  # fmt: skip
    return dataclasses.replace(
        grid,
        domains=keep["domains"] or grid.domains,
        seeds=keep["seeds"] or grid.seeds,
        methods=tuple(m for m in grid.methods if m.method in keep["methods"]) if methods else grid.methods,
    )


def _subset(what: str, asked: Sequence[Any] | None, have: Sequence[Any]) -> tuple[Any, ...] | None:
    """The grid's values of `what` that `asked` names (None: no restriction)."""
    if asked is None:
        return None
    twice = [str(v) for v in dict.fromkeys(asked) if list(asked).count(v) > 1]
    if twice:
        raise UserError(f"--{what} names {', '.join(twice)} more than once; give each once")
    missing = [str(v) for v in asked if v not in have]
    if missing:
        raise UserError(
            f"--{what} {', '.join(missing)}: not in the grid, which lists {', '.join(map(str, have))}; "
            f"--{what} only restricts a grid: add the value to the grid file to run it"
        )
    return tuple(v for v in have if v in asked)


# ------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class PipelineConfig:
    """What `cpl-cache run` asks for: a grid file, the cache, where results go, and optional subsets."""

    pipeline: Path
    cache_dir: Path
    results: Path = Path("results")
    device: str = "auto"
    domains: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    methods: tuple[str, ...] | None = None
    progress: bool = True
    select: str = "hold"  # how each trained cell's candidates are chosen: hold, weak or none
    precision: str = "auto"  # matrix products in bf16 where native, else fp32 (runtime.resolve_precision)


@dataclass
class PipelineSummary:
    """What a run did: cells trained, skipped as up to date, and recomputed because they were stale."""

    cells: int = 0
    ran: int = 0
    skipped: int = 0
    claimed: int = 0  # left to another run that holds their claim
    stale: list[str] = field(default_factory=list)
    seconds: float = 0.0
    results: Path = Path("results")

    def line(self) -> str:
        stale = f" ({len(self.stale)} of them stale)" if self.stale else ""
        others = f", {self.claimed} left to another run training them" if self.claimed else ""
        return (
            f"{self.cells} cell(s): {self.ran} trained{stale}, {self.skipped} already done{others}; "
            f"results in {self.results} ({self.seconds:.1f} s)"
        )


@dataclass(frozen=True)
class PlannedCell:
    """One planned run: where its result goes and the hyperparameters it will record."""

    domain: str
    path: Path
    hparams: dict[str, Any]  # as a results file holds them (through JSON)
    cell: Any  # cpl_cache.train.trainer.Cell

    @property
    def label(self) -> str:
        return f"{self.domain}/{self.cell.name}-seed{self.cell.seed}"


def _stale_reason(cell: PlannedCell, fingerprint: str) -> str | None:
    """Why the existing result of `cell` cannot be reused, or None when it can."""
    try:
        record = json.loads(cell.path.read_text(encoding="utf-8"))
        recorded = record["cache"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the file is unreadable"
    if recorded != fingerprint:
        return f"it came from another cache (fingerprint {recorded}, the cache now has {fingerprint})"
    if record.get("hparams") != cell.hparams:
        return "it was run with other hyperparameters (the method's defaults changed)"
    return None


def plan(cfg: PipelineConfig) -> list[PlannedCell]:
    """Every cell of the grid, checked, with its result path; refuses bad settings up front."""
    trainer = _trainer()
    registry = _registry()
    grid = restrict(
        load_grid(cfg.pipeline, registry), domains=cfg.domains, seeds=cfg.seeds, methods=cfg.methods,
        registry=registry,
    )  # fmt: skip
    cells: list[PlannedCell] = []
    seen: set[tuple[str, str, int]] = set()
    for domain, spec, seed in grid.cells():
        tcfg = trainer.TrainConfig(
            method=spec.method, domain=domain, cache_dir=Path(cfg.cache_dir), out=Path(cfg.results),
            seed=seed, overrides=grid.settings(spec, registry), device=cfg.device, select=cfg.select,
        )  # fmt: skip
        try:
            cell = trainer.resolve(tcfg)
        except UserError as err:
            raise UserError(f"{cfg.pipeline}, method {spec.method!r}: {err}") from None
        if (domain, cell.name, seed) in seen:
            raise UserError(
                f"{cfg.pipeline}: two method lines both run as {cell.name!r} (same settings after defaults); "
                "keep one of them"
            )
        seen.add((domain, cell.name, seed))
        path = trainer.result_path(Path(cfg.results), domain, cell.name, seed)
        cells.append(PlannedCell(domain, path, json.loads(json.dumps(cell.hparams)), cell))
    return cells


def _fingerprints(cfg: PipelineConfig, domains: list[str]) -> dict[str, str]:
    """Each domain's cache fingerprint; refuses up front, naming every domain the cache lacks."""
    missing = [d for d in domains if not (Path(cfg.cache_dir) / d / MANIFEST).is_file()]
    if missing and Path(cfg.cache_dir).is_dir():
        have = [d for d in domains if d not in missing]
        fix = (
            f"or run the cached one(s) alone with --domains {','.join(have)}"
            if have
            else "or point --cache-dir at the cache that extract wrote"
        )
        raise UserError(
            f"{cfg.cache_dir} has no cache of {', '.join(missing)} (the grid asks for {len(domains)} "
            f"domain(s)); run `cpl-cache extract --domain D --data-root R --weak W --cache-dir "
            f"{cfg.cache_dir}` for each, {fix}"
        )
    return {d: manifest_identity(read_manifest(cfg.cache_dir, d))["fingerprint"] for d in domains}


def run_pipeline(cfg: PipelineConfig) -> PipelineSummary:
    """Run every cell of the grid that has no up-to-date result; return what was done.

    Each domain's cache is loaded once, and its missing cells train stacked (see cpl_cache.train.trainer)."""
    from cpl_cache import claims
    from cpl_cache.runtime import progress, resolve_device, resolve_precision

    start = time.perf_counter()
    cells = plan(cfg)
    claims.sweep(Path(cfg.results))  # temporary files of runs that were killed
    domains = list(dict.fromkeys(c.domain for c in cells))
    fingerprints = _fingerprints(cfg, domains)
    summary = PipelineSummary(cells=len(cells), results=Path(cfg.results))
    todo: dict[str, list[PlannedCell]] = {d: [] for d in domains}
    notes = []
    for cell in cells:
        why = _stale_reason(cell, fingerprints[cell.domain]) if cell.path.is_file() else "missing"
        if why is None:
            summary.skipped += 1
            continue
        todo[cell.domain].append(cell)
        if why != "missing":
            summary.stale.append(cell.label)
            notes.append(f"recomputing {cell.label}: {why}")

    if summary.skipped < summary.cells:
        device = resolve_device(cfg.device)  # once, so a bad --device fails before any training
        resolve_precision(cfg.precision, device)  # likewise a bad --precision; each domain resolves its own
        bar = progress(
            total=summary.cells, initial=summary.skipped, unit="cell", desc="run", disable=not cfg.progress
        )
        try:
            for note in notes:
                bar.write(note, file=sys.stderr)
            for domain, pending in todo.items():
                mine = [c for c in pending if claims.claim(c.path)]  # another run may be training the rest
                if len(mine) < len(pending):
                    summary.claimed += len(pending) - len(mine)
                    bar.write(
                        f"{len(pending) - len(mine)} cell(s) of {domain} are being trained by another run on "
                        f"{cfg.results}; leaving them to it",
                        file=sys.stderr,
                    )
                    bar.update(len(pending) - len(mine))
                if not mine:
                    continue
                try:  # the claims are given up however the domain ends, a bad cache included
                    _train_domain(cfg, domain, mine, device, summary, bar)
                finally:
                    for c in mine:
                        claims.release(c.path)
        finally:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _train_domain(
    cfg: PipelineConfig,
    domain: str,
    cells: list[PlannedCell],
    device: str,
    summary: PipelineSummary,
    bar: Any,
) -> None:
    """Load one domain's cache onto the device once and train its cells there, stacked."""
    from cpl_cache.cache import domain_dir, load_domain

    trainer = _trainer()
    bar.set_postfix_str(f"loading {domain}")
    data = trainer.DomainTensors(
        load_domain(cfg.cache_dir, domain), device, str(domain_dir(cfg.cache_dir, domain)), cfg.precision
    )
    bar.set_postfix_str(domain)

    def done(n: int) -> None:
        summary.ran += n
        bar.update(n)

    try:
        trainer.train_cells([c.cell for c in cells], data, Path(cfg.results), done)
    except UserError as err:
        raise UserError(f"{domain}: {err}") from None
