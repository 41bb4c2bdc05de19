"""The sweep file: fixed run-config values, a grid of swept values, the centralized reference.

A sweep file (YAML, kebab-case run-config keys)::

    name: strategies
    fixed: {image-size: 64, num-server-rounds: 3}       # every cell
    grid:                                               # cartesian product, in this order
      strategy: [fedavg, fedprox]
      partitioner: [iid, label-wise]
      num-clients: [4]                                  # simulated SuperNodes
      seed: [0, 1]
    exclude: [{partitioner: label-wise, num-clients: 10}]   # combinations left out (*)
    centralized: true           # or a mapping of values the reference cells use instead
    table: {rows: [strategy, partitioner], metrics: [image_auroc, aupro]}
    cell-timeout: 1800          # seconds per cell
    runner: flwr                # or in-process
    peers: [patchcore, padim]   # anomalib models on the same images (docs/peers.md)

(*) A rule that names only keys of the centralized reference's own (not federation keys) also
removes the reference of those combinations; name a federation key (e.g. ``num-clients``) to
leave out federated cells only.

Each combination is a federated cell. The centralized reference is one client holding all the
data (1 SuperNode, ``min-train-nodes=1``, FedAvg over a single IID partition) with the same
training budget; there is one reference cell per combination of the keys that do not concern the
federation (e.g. per seed, per batch size).

``peers`` (a list of anomalib image model names, or a mapping name -> that model's init options
and the peer options ``backbone``, ``layers``, ``max_epochs``) adds, per peer, one cell for each
combination of the federated cells' values of the data keys (the keys that do not concern the
federation, ``method`` and fedad's method settings aside) and of the split keys
(:data:`PEER_SPLIT_KEYS`: the sites' training images depend on them). A peer cell fits the
anomalib model on the normal training images of all the sites of its federated cells, and tests
it on their test split, in its own process (:mod:`fedad.bench.peer`, whatever the ``runner``);
``method`` must be swept, as it tells the peers' rows from fedad's. Cells run in the order of
:meth:`SweepSpec.cells`: the references (centralized, then peers) first.

``fedad bench --set KEY=VALUE`` overrides the file's run-config values (:func:`with_overrides`).

``runner: flwr`` runs each cell as a real `flwr run` simulation (Ray backend);
``runner: in-process`` runs it through :func:`fedad.inprocess.run_in_process` (the same server
workflow and site code, no Ray) in a fresh Python process per cell. Both write the same cell
folder (see :mod:`fedad.bench.sweep`).

Report options of ``table`` beyond rows / metrics / columns / labels / values (see
:mod:`fedad.bench.tables`)::

    table:
      derived: [epsilon, model_distance]     # per-cell columns computed by the report
      reference: {strategy: fedavg, attack: none}   # the cell model_distance measures against
      mean-over: category       # a row key: adds "mean" rows, the mean of its rows' means
      compare: {dadda-synthesis: [dadda, dam-only]}   # how often the first beats the second
      scale: 100                # metrics shown multiplied (e.g. in %)
      digits: 1                 # decimals shown
"""

from __future__ import annotations

import importlib.util
import itertools
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli
import yaml

from fedad.config import section_keys

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
NUM_CLIENTS = "num-clients"
FEDERATED, CENTRALIZED, PEER = "federated", "centralized", "peer"
NOT_APPLICABLE = "–"
DEFAULT_METRICS = ("image_auroc", "pixel_auroc", "aupro")
FEDERATION_KEYS = frozenset({
    "strategy", "base-strategy", "partitioner", "dirichlet-alpha", NUM_CLIENTS, "fraction-train",
    "min-train-nodes", "proximal-mu", "server-lr", "server-momentum", "trim-beta",
    "num-malicious-nodes",
})
FEDERATION_PREFIXES = ("aca-", "cfa-")
PEER_SPLIT_KEYS = frozenset({NUM_CLIENTS, "partitioner", "dirichlet-alpha"})
"""Federation keys that decide which images are the sites' training images: a peer cell takes
them from its federated cells."""
PEER_METHOD = "anomalib-{}"
"""The ``method`` a peer cell shows in tables."""
SPEC_KEYS = frozenset({"name", "fixed", "grid", "exclude", "centralized", "table",
                       "cell-timeout", "cpus-per-client", "runner", "peers"})
TABLE_KEYS = frozenset({"rows", "metrics", "columns", "labels", "values", "derived",
                        "reference", "mean-over", "compare", "scale", "digits"})
RUNNERS = ("flwr", "in-process")
DERIVED_ROW_KEYS = frozenset({"epsilon", "category_kind"})
"""Derived columns that are a function of the cell's run-config: usable as row keys."""
DERIVED_METRICS = frozenset({"model_distance"})
"""Derived columns measured on the cell's results: usable as metrics."""
MODEL_DISTANCE = "model_distance"


class SweepError(ValueError):
    """A sweep file or sweep folder is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class TableSpec:
    """Layout of the sweep's table.

    Attributes:
        rows: swept keys that identify a row (``seed`` is averaged over, never a row key).
        metrics: summary metrics shown as mean ± std over seeds.
        columns: optional swept key whose values become column groups (``value / metric``).
        labels: header renames, e.g. ``{partitioner: IID}``.
        values: value renames per key, e.g. ``{partitioner: {iid: ✓, label-wise: ✗}}``.
        derived: columns the report computes per cell (``epsilon``, ``category_kind``: row keys;
            ``model_distance``: a metric).
        reference: the swept values of the cell ``model_distance`` measures against (the other
            swept values are the cell's own).
        mean_over: a row key; adds rows whose value of it is ``mean``: the mean of the row
            means over its values.
        compare: (key, value, baseline): counts the paired cells where ``value`` beats
            ``baseline`` on each metric.
        scale: factor the shown metrics are multiplied by.
        digits: decimals shown.
    """

    rows: tuple[str, ...]
    metrics: tuple[str, ...] = DEFAULT_METRICS
    columns: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    values: dict[str, dict[str, str]] = field(default_factory=dict)
    derived: tuple[str, ...] = ()
    reference: dict[str, Any] = field(default_factory=dict)
    mean_over: str = ""
    compare: tuple[str, ...] = ()
    scale: float = 1.0
    digits: int = 3

    def to_dict(self) -> dict[str, Any]:
        """The ``table`` mapping of a sweep file (empty options left out)."""
        compare = {self.compare[0]: list(self.compare[1:])} if self.compare else {}
        table = {"rows": list(self.rows), "metrics": list(self.metrics),
                 "columns": self.columns, "labels": self.labels, "values": self.values,
                 "derived": list(self.derived), "reference": self.reference,
                 "mean-over": self.mean_over, "compare": compare}
        out = {k: v for k, v in table.items() if v}
        return {**out, "scale": self.scale, "digits": self.digits}


@dataclass(frozen=True)
class Cell:
    """One simulation of the sweep.

    Attributes:
        name: folder name, unique in the sweep, built from the swept values.
        kind: ``federated``, ``centralized`` or ``peer``.
        params: the swept values as shown in tables (``strategy`` is ``centralized`` and other
            federation keys ``–`` for the reference; ``method`` is ``anomalib-<model>`` and the
            federation keys but the split keys ``–`` for a peer).
        run_config: the run-config of its `flwr run` (the sweep adds ``results-dir``); for a
            peer, the data and split its federated cells use (no ``method``).
        num_clients: simulated SuperNodes (for a peer: the sites whose images it trains on).
        peer: for a peer cell, ``{"model": anomalib name, "options": its options}``.
    """

    name: str
    kind: str
    params: dict[str, Any]
    run_config: dict[str, Any]
    num_clients: int
    peer: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file (see the module docstring)."""

    name: str
    source: str
    fixed: dict[str, Any]
    grid: dict[str, tuple[Any, ...]]
    centralized: dict[str, Any] | None
    table: TableSpec
    exclude: tuple[dict[str, Any], ...] = ()
    cell_timeout: float = 3600.0
    cpus_per_client: int = 1
    runner: str = "flwr"
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The sweep file's mapping (``parse_spec(spec.to_dict(), ...)`` gives it back)."""
        centralized = False if self.centralized is None else (self.centralized or True)
        return {"name": self.name, "fixed": self.fixed,
                "grid": {k: list(v) for k, v in self.grid.items()},
                "exclude": list(self.exclude), "centralized": centralized,
                "table": self.table.to_dict(), "cell-timeout": self.cell_timeout,
                "cpus-per-client": self.cpus_per_client, "runner": self.runner,
                "peers": self.peers}

    def cells(self) -> list[Cell]:
        """The references first (the centralized cells, then the peer cells), then every
        federated combination."""
        out = self._centralized_cells() if self.centralized is not None else []
        federated = self._federated_cells()
        return out + self._peer_cells(federated) + federated

    def _federated_cells(self) -> list[Cell]:
        out = []
        keys = list(self.grid)
        for combo in itertools.product(*self.grid.values()):
            params = dict(zip(keys, combo, strict=True))
            if any(all(params[k] == v for k, v in rule.items()) for rule in self.exclude):
                continue
            values = {**self.fixed, **params}
            num_clients = int(values.pop(NUM_CLIENTS))
            run_config = {"min-train-nodes": num_clients, **values}
            name = _cell_name(params)
            out.append(Cell(name, FEDERATED, _table_params(params, num_clients), run_config,
                            num_clients))
        return out

    def _centralized_cells(self) -> list[Cell]:
        assert self.centralized is not None
        kept = [k for k in self.grid if not is_federation_key(k) and k not in self.centralized]
        cells = []
        for combo in itertools.product(*(self.grid[k] for k in kept)):
            chosen = dict(zip(kept, combo, strict=True))
            if any(rule.keys() <= chosen.keys() and all(chosen[k] == v for k, v in rule.items())
                   for rule in self.exclude):
                continue  # an excluded combination of the reference's own keys
            values = {k: v for k, v in self.fixed.items() if not is_federation_key(k)}
            values.update({**chosen, **self.centralized})
            run_config = {**values, "strategy": "fedavg", "partitioner": "iid",
                          "min-train-nodes": 1}
            params = {k: _centralized_param(k, chosen, self.centralized) for k in self.grid}
            name = _cell_name({CENTRALIZED: "ref", **chosen})
            cells.append(Cell(name, CENTRALIZED, _table_params(params, 1), run_config, 1))
        return cells

    def _peer_cells(self, federated: list[Cell]) -> list[Cell]:
        """Per peer, a cell per distinct combination of the federated cells' values of the
        :func:`is_peer_key` keys (so excluded combinations have no peer either)."""
        kept = [k for k in self.grid if is_peer_key(k)]
        combos = dict.fromkeys(tuple(c.params[k] for k in kept) for c in federated)
        cells = []
        for combo in combos:
            chosen = dict(zip(kept, combo, strict=True))
            values = {k: v for k, v in {**self.fixed, **chosen}.items() if k != "method"}
            num_clients = int(values.pop(NUM_CLIENTS))
            for model, options in self.peers.items():
                params = {k: PEER_METHOD.format(model) if k == "method"
                          else chosen.get(k, NOT_APPLICABLE) for k in self.grid}
                cells.append(Cell(_cell_name({PEER: model, **chosen}), PEER,
                                  _table_params(params, num_clients), values, num_clients,
                                  {"model": model, "options": options}))
        return cells


def is_peer_key(key: str) -> bool:
    """True for swept keys that change a peer's images: data keys and split keys, not
    ``method`` nor the settings of fedad's methods (e.g. feature-source, num-prototypes: a peer
    takes its backbone from its own ``backbone`` option or the fixed feature-source)."""
    if key == "method" or key in section_keys():
        return False
    return key in PEER_SPLIT_KEYS or not is_federation_key(key)


def is_federation_key(key: str) -> bool:
    """True for settings that only concern the federation (strategy, partitions, clients)."""
    return key in FEDERATION_KEYS or key.startswith(FEDERATION_PREFIXES)


def _centralized_param(key: str, chosen: dict[str, Any], overrides: dict[str, Any]) -> Any:
    if key == "strategy":
        return CENTRALIZED
    if key == NUM_CLIENTS:
        return 1
    if key in overrides:
        return overrides[key]
    return chosen.get(key, NOT_APPLICABLE)


def _table_params(params: dict[str, Any], num_clients: int) -> dict[str, Any]:
    return {**params, NUM_CLIENTS: num_clients}


def _cell_name(params: dict[str, Any]) -> str:
    """``{"strategy": "fedavg", "seed": 0}`` -> ``strategy-fedavg__seed-0`` (folder-safe)."""
    parts = [f"{key}-{re.sub(r'[^A-Za-z0-9.]+', '-', str(value)).strip('-')}"
             for key, value in params.items()]
    return "__".join(parts) or "cell"


def app_config_keys(app_dir: Path = PROJECT_ROOT) -> frozenset[str]:
    """Run-config keys the Flower App declares ([tool.flwr.app.config] of its pyproject.toml)."""
    with open(app_dir / "pyproject.toml", "rb") as handle:
        return frozenset(tomli.load(handle)["tool"]["flwr"]["app"]["config"])


def load_spec(path: str | Path, app_dir: Path = PROJECT_ROOT,
              overrides: list[str] | None = None) -> SweepSpec:
    """Read and validate a sweep file (SweepError naming the file and key otherwise).

    Args:
        overrides: ``KEY=VALUE`` texts (``fedad bench --set``), see :func:`with_overrides`.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"{path}: cannot read sweep file ({err})") from err
    known = app_config_keys(app_dir)
    if overrides:
        data = with_overrides(data, overrides, str(path), known)
    return parse_spec(data, str(path), known, default_name=path.stem)


def with_overrides(data: Any, overrides: list[str], source: str,
                   known_keys: frozenset[str]) -> dict[str, Any]:
    """The sweep file's mapping with ``KEY=VALUE`` overrides (the value read as YAML, e.g.
    ``image-size=64`` an int): a swept key is swept over that one value, any other key becomes
    fixed. SweepError naming a malformed override or a key the App does not have."""
    if not isinstance(data, dict):
        raise SweepError(f"{source}: expected a mapping with 'fixed' and 'grid'")
    fixed, grid = dict(data.get("fixed") or {}), dict(data.get("grid") or {})
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--set {text!r}: expected KEY=VALUE")
        if key not in known_keys and key != NUM_CLIENTS:
            raise SweepError(f"--set {key}: not a run-config key of the App (see "
                             "[tool.flwr.app.config] in pyproject.toml)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SweepError(f"--set {key}: cannot read {value!r} ({err})") from err
        if key in grid:
            grid[key] = [parsed]
        else:
            fixed[key] = parsed
    return {**data, "fixed": fixed, "grid": grid}


def parse_spec(data: Any, source: str, known_keys: frozenset[str],
               default_name: str = "sweep") -> SweepSpec:
    """Validate the mapping of a sweep file; ``known_keys`` are the App's run-config keys."""
    if not isinstance(data, dict):
        raise SweepError(f"{source}: expected a mapping with 'fixed' and 'grid'")
    _no_unknown(data, SPEC_KEYS, source, "")
    fixed = _mapping(data.get("fixed"), source, "fixed")
    grid_raw = _mapping(data.get("grid"), source, "grid")
    grid: dict[str, tuple[Any, ...]] = {}
    for key, values in grid_raw.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{source}: grid.{key}: expected a non-empty list of values")
        if len(set(map(str, values))) != len(values):
            raise SweepError(f"{source}: grid.{key}: repeated values {values}")
        grid[key] = tuple(values)
    both = set(fixed) & set(grid)
    if both:
        raise SweepError(f"{source}: {', '.join(sorted(both))} both fixed and swept")
    centralized = _centralized(data.get("centralized", False), source)
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list):
        raise SweepError(f"{source}: exclude: expected a list of mappings")
    for i, rule in enumerate(exclude):
        rule = _mapping(rule, source, f"exclude[{i}]")
        unknown = set(rule) - set(grid)
        if not rule or unknown:
            raise SweepError(f"{source}: exclude[{i}]: {sorted(unknown) or 'empty'}: only "
                             f"swept keys ({', '.join(grid)})")
    for section, keys in (("fixed", fixed), ("grid", grid), ("centralized", centralized or {})):
        for key in keys:
            if key in ("results-dir", "resume-from"):
                raise SweepError(f"{source}: {section}.{key}: set by the sweep for each cell")
            if key not in known_keys and key != NUM_CLIENTS:
                raise SweepError(f"{source}: {section}.{key}: not a run-config key of the App "
                                 "(see [tool.flwr.app.config] in pyproject.toml)")
    clients = grid.get(NUM_CLIENTS, (fixed.get(NUM_CLIENTS),))
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in clients):
        raise SweepError(f"{source}: {NUM_CLIENTS}: expected positive integers, got {clients}")
    timeout = float(data.get("cell-timeout", 3600.0))
    cpus = data.get("cpus-per-client", 1)
    if timeout <= 0 or not isinstance(cpus, int) or cpus < 1:
        raise SweepError(f"{source}: cell-timeout must be > 0 and cpus-per-client an int >= 1")
    runner = data.get("runner", RUNNERS[0])
    if runner not in RUNNERS:
        raise SweepError(f"{source}: runner={runner!r}: expected one of {', '.join(RUNNERS)}")
    peers = _peers(data.get("peers"), source)
    if peers and "method" not in grid:
        raise SweepError(f"{source}: peers: needs method in grid (e.g. method: [padim]): "
                         "the peers' rows are told from fedad's by their method")
    return SweepSpec(
        name=str(data.get("name", default_name)), source=source, fixed=fixed, grid=grid,
        centralized=centralized, table=_table(data.get("table"), grid, source),
        exclude=tuple(_mapping(rule, source, "exclude") for rule in exclude),
        cell_timeout=timeout, cpus_per_client=cpus, runner=runner, peers=peers,
    )


def peer_model_names() -> tuple[str, ...] | None:
    """anomalib's image models by their module name (``patchcore``, ``padim``,
    ``efficient_ad``, ...), read from the installed package without importing it (its models
    take seconds to import); None when anomalib is not installed."""
    found = importlib.util.find_spec("anomalib")
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(found.submodule_search_locations[0]) / "models" / "image"
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if m.ispkg))


def _peers(value: Any, source: str) -> dict[str, dict[str, Any]]:
    """``[name, ...]`` or ``{name: options}`` -> ``{name: options}``; names checked against
    anomalib's image models when anomalib is installed (without it, the peer cells fail)."""
    if isinstance(value, list):
        if not all(isinstance(name, str) for name in value) or len(set(value)) != len(value):
            raise SweepError(f"{source}: peers: expected distinct model names or a mapping "
                             f"name -> options, got {value}")
        value = dict.fromkeys(value, None)
    peers = {name: _mapping(options, source, f"peers.{name}")
             for name, options in _mapping(value, source, "peers").items()}
    known = peer_model_names()
    unknown = sorted(set(peers) - set(known or peers))
    if unknown:
        raise SweepError(f"{source}: peers: {', '.join(unknown)}: not an anomalib image model "
                         f"(expected one of {', '.join(known or ())})")
    return peers


def _centralized(value: Any, source: str) -> dict[str, Any] | None:
    if value is False or value is None:
        return None
    if value is True:
        return {}
    return _mapping(value, source, "centralized")


def _table(value: Any, grid: dict[str, tuple[Any, ...]], source: str) -> TableSpec:
    table = _mapping(value, source, "table")
    _no_unknown(table, TABLE_KEYS, source, "table.")
    derived = tuple(table.get("derived", ()))
    unknown = sorted(set(derived) - DERIVED_ROW_KEYS - DERIVED_METRICS)
    if unknown:
        raise SweepError(f"{source}: table.derived: unknown {', '.join(unknown)} (expected "
                         f"{', '.join(sorted(DERIVED_ROW_KEYS | DERIVED_METRICS))})")
    row_keys = [*grid, *(k for k in derived if k in DERIVED_ROW_KEYS)]
    swept = [k for k in grid if k != "seed"]
    rows = tuple(table.get("rows", [k for k in swept if k != table.get("columns")]))
    columns = str(table.get("columns", ""))
    for key in (*rows, *([columns] if columns else [])):
        if key not in row_keys:
            raise SweepError(f"{source}: table: {key!r} is not a swept key (grid: "
                             f"{', '.join(grid)}) nor a derived row key")
    if "seed" in rows or columns == "seed":
        raise SweepError(f"{source}: table: seed is averaged over, not a row or column")
    metrics = tuple(table.get("metrics", DEFAULT_METRICS))
    if not metrics:
        raise SweepError(f"{source}: table.metrics: expected at least one metric")
    if MODEL_DISTANCE in metrics and MODEL_DISTANCE not in derived:
        raise SweepError(f"{source}: table.metrics: {MODEL_DISTANCE} needs table.derived")
    values = {k: {str(a): str(b) for a, b in _mapping(v, source, f"table.values.{k}").items()}
              for k, v in _mapping(table.get("values"), source, "table.values").items()}
    labels = {str(k): str(v) for k, v in _mapping(table.get("labels"), source,
                                                     "table.labels").items()}
    reference = _mapping(table.get("reference"), source, "table.reference")
    if (MODEL_DISTANCE in derived) != bool(reference) or set(reference) - set(grid):
        raise SweepError(f"{source}: table.reference: swept values of the reference cell, "
                         f"needed by (and only by) derived {MODEL_DISTANCE}")
    mean_over = str(table.get("mean-over", ""))
    if mean_over and mean_over not in rows:
        raise SweepError(f"{source}: table.mean-over: {mean_over!r} is not a row key")
    compare = _compare(table.get("compare"), grid, source)
    scale, digits = table.get("scale", 1.0), table.get("digits", 3)
    if not isinstance(scale, int | float) or scale <= 0 or not isinstance(digits, int) \
            or digits < 0:
        raise SweepError(f"{source}: table: scale must be > 0 and digits an int >= 0")
    return TableSpec(rows=rows, metrics=metrics, columns=columns, labels=labels, values=values,
                     derived=derived, reference=reference, mean_over=mean_over, compare=compare,
                     scale=float(scale), digits=digits)


def _compare(value: Any, grid: dict[str, tuple[Any, ...]], source: str) -> tuple[str, ...]:
    """``{key: [value, baseline]}`` -> ``(key, value, baseline)`` (``()`` when not set)."""
    compare = _mapping(value, source, "table.compare")
    if not compare:
        return ()
    key, pair = next(iter(compare.items()))
    if len(compare) != 1 or key not in grid or not isinstance(pair, list) or len(pair) != 2 \
            or any(v not in grid[key] for v in pair):
        raise SweepError(f"{source}: table.compare: expected {{swept key: [value, baseline]}} "
                         "with two of the key's values")
    return (key, *map(str, pair))


def _mapping(value: Any, source: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def _no_unknown(data: dict, allowed: frozenset[str], source: str, prefix: str) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
                         f"(expected {', '.join(sorted(allowed))})")
