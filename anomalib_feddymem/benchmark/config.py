"""Settings of a benchmark run: one dataclass, loadable from YAML, every field also a CLI flag.

``anomalib_feddymem/configs/benchmark/*.yaml`` hold the keys of :class:`BenchmarkConfig`. The federation-shaped
fields (clients, partition, alpha, rounds, ...) mean exactly what they mean for
:class:`~anomalib_feddymem.federation.config.FederationConfig`, which
:meth:`BenchmarkConfig.federation` builds for every FedDyMem run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from anomalib_feddymem.federation.config import FederationConfig, load_dataclass_config
from anomalib_feddymem.federation.partition import SCHEMES

__all__ = ["ABLATIONS", "METHODS", "BenchmarkConfig", "load_benchmark_config"]

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
    "no_generator",
    "metric_loss",
    "no_dynamic_update",
    "no_growth",
    "abstract_kmeans",
    "reduce_ratio",
    "global_memory_size",
    "embedding_dim",
    "upload_precision",
    "alpha",
)
#: FedDyMem options the benchmark shares with Patchcore (same backbone, layers and weights).
SHARED_BACKBONE_OPTIONS = ("backbone", "layers", "pre_trained")


def _default_frontier() -> dict[str, Any]:
    return {"reduce_ratios": [4, 8, 32], "coreset_ratios": [0.1, 0.03, 0.01]}


def _default_ablation() -> dict[str, Any]:
    return {
        "variants": list(ABLATIONS),
        "reduce_ratios": [2, 8, 32],
        "global_memory_sizes": [256, 1024, 4096],
        "embedding_dims": [32, 64],
        "upload_precisions": ["float32", "float16", "int8"],
        "alphas": [0.1, 0.5, 10.0],
    }


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on.

    Attributes:
        data_root: Folder of MVTec-layout dataset folders; ``None`` generates the embedded
            synthetic products under ``output/data/synthetic``.
        datasets: Dataset folder names (or synthetic product names); missing folders are skipped
            with a warning.
        clients: Clients ``N`` of the federated and local methods.
        partition: Partition scheme of the training images (``dirichlet`` is non-IID).
        alpha: Dirichlet concentration.
        rounds: Communication rounds ``R`` of FedDyMem (central FedDyMem trains as long:
            ``R`` rounds of one client).
        local_epochs: Local epochs per round.
        seed: Seed of partition, models, training, aggregation and coresets.
        output: Output folder (results.csv, results.md, plots, runs/).
        image_size: Square input size of every method.
        batch_size: Train and eval batch size.
        methods: Methods to run (a subset of :data:`METHODS`).
        model: FedDyMem options (``backbone``, ``layers`` and ``pre_trained`` are also Patchcore's).
        patchcore: Further Patchcore options (``coreset_sampling_ratio``, ``num_neighbors``).
        server_coreset_ratio: patchcore_federated: fraction of the union of the clients' coresets
            that the server keeps (a k-center greedy coreset of the union).
        openvino: Also time the FedDyMem models exported to OpenVINO.
        timing_images: Test images (of each dataset) every model is timed on, one at a time.
        timing_threads: CPU threads of torch and OpenVINO while timing (1: stable on a shared CPU).
        heatmap_images: Test images per dataset shown in the heatmap figure.
        accelerator: Lightning accelerator of training (evaluation and timing run on the CPU).
        synthetic: Size of the generated data when ``data_root`` is ``None``.
        ablation: ``variants`` (names of :data:`ABLATIONS`) and the sweeps' values
            (``reduce_ratios``, ``global_memory_sizes``, ``embedding_dims``, ``upload_precisions``,
            ``alphas``).
        frontier: Upload budgets of ``--frontier``: FedDyMem's ``reduce_ratios`` and naive
            federated Patchcore's ``coreset_ratios``.
    """

    data_root: str | None = None
    datasets: list[str] = field(default_factory=lambda: ["stripes", "checker", "disc", "grain"])
    clients: int = 4
    partition: str = "dirichlet"
    alpha: float = 0.5
    rounds: int = 3
    local_epochs: int = 1
    seed: int = 0
    output: str = "outputs/benchmark"
    image_size: int = 128
    batch_size: int = 8
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    model: dict[str, Any] = field(default_factory=dict)
    patchcore: dict[str, Any] = field(default_factory=lambda: {"coreset_sampling_ratio": 0.1, "num_neighbors": 9})
    server_coreset_ratio: float = 0.1
    openvino: bool = True
    timing_images: int = 8
    timing_threads: int = 1
    heatmap_images: int = 3
    accelerator: str = "auto"
    synthetic: dict[str, int] = field(default_factory=lambda: {"train_per_product": 12})
    ablation: dict[str, Any] = field(default_factory=_default_ablation)
    frontier: dict[str, Any] = field(default_factory=_default_frontier)

    def __post_init__(self) -> None:
        """Normalise and check every option, naming the bad one."""
        if isinstance(self.datasets, str):
            self.datasets = [name.strip() for name in self.datasets.split(",") if name.strip()]
        if isinstance(self.methods, str):
            self.methods = [name.strip() for name in self.methods.split(",") if name.strip()]
        self.datasets, self.methods = list(self.datasets), list(self.methods)
        if self.data_root in ("", None):
            self.data_root = None
        if not self.datasets:
            msg = "datasets must name at least one dataset folder."
            raise ValueError(msg)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            msg = f"methods: unknown {unknown or '(none given)'}; choose from {list(METHODS)}."
            raise ValueError(msg)
        if self.partition not in SCHEMES:
            msg = f"partition must be one of {list(SCHEMES)}, got {self.partition!r}."
            raise ValueError(msg)
        for name in ("clients", "rounds", "local_epochs", "image_size", "batch_size", "timing_images", "timing_threads"):
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

    @property
    def output_dir(self) -> Path:
        """``output`` as a path."""
        return Path(self.output)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> BenchmarkConfig:  # noqa: ANN401
        """A copy with ``changes`` (``None`` values are ignored: unset CLI flags)."""
        return dataclasses.replace(self, **{key: value for key, value in changes.items() if value is not None})

    def patchcore_options(self) -> dict[str, Any]:
        """Patchcore keyword arguments: FedDyMem's backbone, layers and weights (as the FedDyMem
        models get them: ``model`` or FedDyMem's defaults) plus ``patchcore``."""
        from anomalib_feddymem.federation.runner import model_option

        shared = {key: model_option(self, key) for key in SHARED_BACKBONE_OPTIONS}  # duck-typed: reads .model
        return {**shared, **self.patchcore}

    def federation(self, output: Path, **changes: Any) -> FederationConfig:  # noqa: ANN401
        """The :class:`FederationConfig` of one FedDyMem run of this benchmark (``changes`` override)."""
        values: dict[str, Any] = {
            "data_root": self.data_root,
            "datasets": list(self.datasets),
            "clients": self.clients,
            "partition": self.partition,
            "alpha": self.alpha,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "seed": self.seed,
            "output": str(output),
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "min_clients": 1,
            "evaluation": "none",  # the benchmark scores the final models per dataset itself
            "progress": False,
            "accelerator": self.accelerator,
            "model": dict(self.model),
        }
        values.update(changes)
        return FederationConfig(**values)


def load_benchmark_config(path: str | Path | None = None, **overrides: Any) -> BenchmarkConfig:  # noqa: ANN401
    """Read a YAML config (keys of :class:`BenchmarkConfig`) and apply non-``None`` overrides.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown key or a bad value, naming the file.
    """
    return load_dataclass_config(BenchmarkConfig, path, **overrides)
