"""Settings of a benchmark run: the federation's own config plus what only the benchmark needs.

``anomalib_feddymem/configs/benchmark/*.yaml`` hold a ``federation:`` mapping (the keys of
:class:`~anomalib_feddymem.federation.config.FederationConfig`: data, clients, partition, rounds,
image size, ``model`` options ...) and the benchmark's own keys (methods, Patchcore options,
timing, ablations, frontier). Every FedDyMem run of a benchmark is that federation config with
its own output folder (:meth:`BenchmarkConfig.run_config`).

Configs written before ``federation:`` existed gave those keys at the top level; they still load
(:data:`FEDERATION_KEYS` are moved under ``federation:``, with a logged note).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anomalib_feddymem.federation.config import FederationConfig, read_options

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["ABLATIONS", "FEDERATION_KEYS", "METHODS", "BenchmarkConfig", "load_benchmark_config"]

logger = logging.getLogger(__name__)

#: Every method the benchmark compares, in table order.
METHODS = (
    "feddymem_federated",
    "feddymem_central",
    "patchcore_central",
    "patchcore_local",
    "patchcore_federated",
)
#: Ablation families: the on/off switches and the sweeps (values in ``BenchmarkConfig.ablation``).
ABLATIONS = (
    "generator",
    "no_dynamic_update",
    "no_growth",
    "averaged_reduce",
    "abstract_kmeans",
    "reduce_ratio",
    "global_memory_size",
    "embedding_dim",
    "upload_precision",
    "alpha",
)
#: FedDyMem options the benchmark shares with Patchcore (same backbone, layers and weights).
SHARED_BACKBONE_OPTIONS = ("backbone", "layers", "pre_trained")
#: Keys of :class:`FederationConfig`: under ``federation:`` in a benchmark YAML (or, in older
#: configs, at its top level).
FEDERATION_KEYS = tuple(f.name for f in dataclasses.fields(FederationConfig))
#: How a benchmark's federation differs from :class:`FederationConfig`'s own defaults.
BENCHMARK_FEDERATION_DEFAULTS: dict[str, Any] = {
    "clients": 4,
    "output": "outputs/benchmark",
    "min_clients": 1,
    "evaluation": "none",  # the benchmark scores the final models per dataset itself
    "progress": False,
}

#: What every FedDyMem run of a benchmark needs whatever ``federation`` says.
BENCHMARK_RUN_SETTINGS = {"min_clients": 1, "evaluation": "none", "progress": False}


def _default_federation() -> FederationConfig:
    return FederationConfig(**BENCHMARK_FEDERATION_DEFAULTS)


def _default_frontier() -> dict[str, Any]:
    return {"reduce_ratios": [4, 6, 32], "coreset_ratios": [0.1, 0.03, 0.01]}


def _default_ablation() -> dict[str, Any]:
    return {
        "variants": list(ABLATIONS),
        "reduce_ratios": [6, 32],
        "global_memory_sizes": [1024, 4096],
        "embedding_dims": [32, 64],
        "upload_precisions": ["float32", "float16", "int8", "int4"],
        "alphas": [0.1, 0.5, 10.0],
    }


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on.

    Attributes:
        federation: The federation every FedDyMem run starts from, and the data, partition, seed
            and image size of every method (``federation.output`` is the benchmark's output
            folder: results.csv, results.md, plots, runs/). ``rounds`` also sets how long central
            FedDyMem trains (``R`` rounds of one client); ``model`` holds FedDyMem options, of
            which ``backbone``, ``layers`` and ``pre_trained`` are also Patchcore's.
        methods: Methods to run (a subset of :data:`METHODS`).
        patchcore: Further Patchcore options (``coreset_sampling_ratio``, ``num_neighbors``).
        server_coreset_ratio: patchcore_federated: fraction of the union of the clients' coresets
            that the server keeps (a k-center greedy coreset of the union).
        openvino: Also time the FedDyMem models exported to OpenVINO.
        timing_images: Test images (of each dataset) every model is timed on, one at a time.
        timing_threads: CPU threads of torch and OpenVINO while timing (1: stable on a shared CPU).
        heatmap_images: Test images per dataset shown in the heatmap figure.
        ablation: ``variants`` (names of :data:`ABLATIONS`) and the sweeps' values
            (``reduce_ratios``, ``global_memory_sizes``, ``embedding_dims``, ``upload_precisions``,
            ``alphas``).
        frontier: Upload budgets of ``--frontier``: FedDyMem's ``reduce_ratios`` and naive
            federated Patchcore's ``coreset_ratios``.
    """

    federation: FederationConfig = field(default_factory=_default_federation)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    patchcore: dict[str, Any] = field(default_factory=lambda: {"coreset_sampling_ratio": 0.1, "num_neighbors": 9})
    server_coreset_ratio: float = 0.1
    openvino: bool = True
    timing_images: int = 8
    timing_threads: int = 1
    heatmap_images: int = 3
    ablation: dict[str, Any] = field(default_factory=_default_ablation)
    frontier: dict[str, Any] = field(default_factory=_default_frontier)

    def __post_init__(self) -> None:
        """Normalise and check every option, naming the bad one."""
        if isinstance(self.federation, Mapping):
            self.federation = FederationConfig(**{**BENCHMARK_FEDERATION_DEFAULTS, **self.federation})
        if not isinstance(self.federation, FederationConfig):
            msg = f"federation must be a mapping of FederationConfig keys, got {type(self.federation).__name__}."
            raise ValueError(msg)  # noqa: TRY004 - a config error, which the CLI reports as one
        if isinstance(self.methods, str):
            self.methods = [name.strip() for name in self.methods.split(",") if name.strip()]
        self.methods = list(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            msg = f"methods: unknown {unknown or '(none given)'}; choose from {list(METHODS)}."
            raise ValueError(msg)
        for name in ("timing_images", "timing_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be an integer >= 1, got {value!r}."
                raise ValueError(msg)
        if not isinstance(self.heatmap_images, int) or self.heatmap_images < 0:
            msg = f"heatmap_images must be an integer >= 0, got {self.heatmap_images!r}."
            raise ValueError(msg)
        if not 0 < self.server_coreset_ratio <= 1:
            msg = f"server_coreset_ratio must be in (0, 1], got {self.server_coreset_ratio}."
            raise ValueError(msg)
        if not 0 < float(self.patchcore.get("coreset_sampling_ratio", 0.1)) <= 1:
            msg = f"patchcore.coreset_sampling_ratio must be in (0, 1], got {self.patchcore['coreset_sampling_ratio']}."
            raise ValueError(msg)
        self.ablation = {**_default_ablation(), **(self.ablation or {})}
        bad = [v for v in self.ablation["variants"] if v not in ABLATIONS]
        if bad:
            msg = f"ablation.variants: unknown {bad}; choose from {list(ABLATIONS)}."
            raise ValueError(msg)
        unknown_keys = sorted(set(self.ablation) - set(_default_ablation()))
        if unknown_keys:
            msg = f"ablation: unknown key(s) {unknown_keys}; known: {sorted(_default_ablation())}."
            raise ValueError(msg)
        self.frontier = {**_default_frontier(), **(self.frontier or {})}
        unknown_keys = sorted(set(self.frontier) - set(_default_frontier()))
        if unknown_keys:
            msg = f"frontier: unknown key(s) {unknown_keys}; known: {sorted(_default_frontier())}."
            raise ValueError(msg)
        if any(not 0 < float(r) <= 1 for r in self.frontier["coreset_ratios"]):
            msg = f"frontier.coreset_ratios must lie in (0, 1], got {self.frontier['coreset_ratios']}."
            raise ValueError(msg)
        if any(float(r) < 1 for r in self.frontier["reduce_ratios"]):
            msg = f"frontier.reduce_ratios must be >= 1, got {self.frontier['reduce_ratios']}."
            raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON), ``federation`` as a nested mapping."""
        return dataclasses.asdict(self)

    def replace(self, **changes: object) -> BenchmarkConfig:
        """A copy with ``changes``: keys of :data:`FEDERATION_KEYS` go to ``federation``.

        ``None`` values are ignored (unset CLI flags); ``model`` options are merged key by key.
        """
        changes = {key: value for key, value in changes.items() if value is not None}
        federation = {key: changes.pop(key) for key in list(changes) if key in FEDERATION_KEYS}
        if "model" in federation:
            federation["model"] = {**self.federation.model, **federation["model"]}
        return dataclasses.replace(self, federation=self.federation.replace(**federation), **changes)

    def patchcore_options(self) -> dict[str, Any]:
        """Patchcore keyword arguments: FedDyMem's backbone, layers and weights, plus ``patchcore``.

        The shared options are those the FedDyMem models get: ``federation.model`` or FedDyMem's defaults.
        """
        from anomalib_feddymem.federation.runner import model_option

        shared = {key: model_option(self.federation, key) for key in SHARED_BACKBONE_OPTIONS}
        return {**shared, **self.patchcore}

    def run_config(self, output: Path, **changes: object) -> FederationConfig:
        """The :class:`FederationConfig` of one FedDyMem run of this benchmark (``changes`` override)."""
        return self.federation.replace(**{**BENCHMARK_RUN_SETTINGS, **changes, "output": str(output)})


def load_benchmark_config(path: str | Path | None = None, **overrides: object) -> BenchmarkConfig:
    """Read a YAML config and apply non-``None`` overrides (federation keys go to ``federation``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown key or a bad value, naming the file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        known = {f.name for f in dataclasses.fields(BenchmarkConfig)} | set(FEDERATION_KEYS)
        path, loaded = read_options(path, known)
        federation = dict(loaded.pop("federation", None) or {})
        moved = [key for key in FEDERATION_KEYS if key in loaded]
        if moved:
            logger.info("%s: top-level %s read as federation.%s (they live under `federation:` now).",
                        path, moved, "/".join(moved))  # fmt: skip
            federation.update({key: loaded.pop(key) for key in moved})
        values = {**loaded, "federation": federation}
    try:
        config = BenchmarkConfig(**values)
        return config.replace(**overrides)
    except (TypeError, ValueError) as error:
        where = f"{path}: " if path is not None else ""
        msg = f"{where}{error}"
        raise ValueError(msg) from error
