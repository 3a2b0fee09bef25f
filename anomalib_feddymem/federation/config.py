"""Settings of a federated run: one dataclass, loadable from YAML, every field also a CLI flag.

``anomalib_feddymem/configs/federated/*.yaml`` (shipped in the wheel) hold the same keys as
:class:`FederationConfig`; ``model`` is a mapping of further :class:`~anomalib_feddymem.FedDyMem`
options (memory sizes, backbone, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from .partition import SCHEMES

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "EVALUATION_MODES",
    "RUN_CONFIG_KEYS",
    "FederationConfig",
    "from_run_config",
    "load_config",
    "read_options",
    "resolve_config_path",
    "shipped_configs",
]

#: When clients evaluate (``FederationConfig.evaluation``).
EVALUATION_MODES = ("every_round", "last_round", "none")


@dataclass
class FederationConfig:
    """Everything a federated FedDyMem run depends on.

    Attributes:
        data_root: Folder whose sub-folders (``datasets``) are MVTec-layout datasets; ``None``
            uses the embedded synthetic dataset, generated under ``output/data``.
        datasets: Products: folder names of ``data_root``, synthetic product names, or anomalib
            datamodules given as anomalib's configs give data (``{class_path, init_args}``).
        clients: Number of clients ``N``.
        partition: ``category``, ``iid``, ``dirichlet`` or ``quantity``.
        alpha: Dirichlet concentration (``dirichlet``/``quantity``).
        rounds: Communication rounds ``R``.
        local_epochs: Local epochs ``E`` per round.
        seed: Seed of partition, model initialisation, training and aggregation.
        output: Output folder (metrics.csv, plots, checkpoints, exports).
        min_clients: Fewest clients whose valid uploads complete a round.
        image_size: Square image size of datasets and model.
        batch_size: Train and eval batch size.
        max_upload_items: Server-side cap on the items of one upload.
        keep_checkpoints: Round checkpoints kept on disk (the latest ones).
        export_openvino: Export every client's final model to OpenVINO IR.
        evaluation: When clients score their own test images: ``every_round``, ``last_round`` or
            ``none`` (a round without evaluation sends ``G`` with the next ``train`` instruction).
        progress: Lightning progress bars for local epochs.
        accelerator: Lightning accelerator of local training.
        synthetic: Size of the generated dataset (``train_per_product``, ``test_good_per_product``,
            ``test_defect_per_type``) when ``data_root`` is ``None``.
        model: Further FedDyMem options, e.g. ``{"memory_size": 512}``.
    """

    data_root: str | None = None
    datasets: list[str | dict[str, Any]] = field(default_factory=lambda: ["stripes", "checker", "disc", "grain"])
    clients: int = 3
    partition: str = "dirichlet"
    alpha: float = 0.5
    rounds: int = 3
    local_epochs: int = 1
    seed: int = 0
    output: str = "outputs/federated"
    min_clients: int = 1
    image_size: int = 128
    batch_size: int = 8
    max_upload_items: int = 65536
    keep_checkpoints: int = 2
    export_openvino: bool = False
    evaluation: str = "every_round"
    progress: bool = True
    accelerator: str = "auto"
    synthetic: dict[str, int] = field(default_factory=lambda: {"train_per_product": 12})
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Normalise and check every option, naming the bad one."""
        if isinstance(self.datasets, str):
            self.datasets = [name.strip() for name in self.datasets.split(",") if name.strip()]
        self.datasets = list(self.datasets)
        if self.data_root in {"", None}:
            self.data_root = None
        if self.partition not in SCHEMES:
            msg = f"partition must be one of {list(SCHEMES)}, got {self.partition!r}."
            raise ValueError(msg)
        positive = {
            "clients": self.clients,
            "rounds": self.rounds,
            "local_epochs": self.local_epochs,
            "min_clients": self.min_clients,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "max_upload_items": self.max_upload_items,
            "keep_checkpoints": self.keep_checkpoints,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be an integer >= 1, got {value!r}."
                raise ValueError(msg)
        if self.evaluation not in EVALUATION_MODES:
            msg = f"evaluation must be one of {list(EVALUATION_MODES)}, got {self.evaluation!r}."
            raise ValueError(msg)
        if self.min_clients > self.clients:
            msg = f"min_clients ({self.min_clients}) cannot exceed clients ({self.clients})."
            raise ValueError(msg)
        if not self.alpha > 0:
            msg = f"alpha must be > 0, got {self.alpha}."
            raise ValueError(msg)
        if not self.datasets:
            msg = "datasets must name at least one product."
            raise ValueError(msg)
        if not isinstance(self.model, dict):
            msg = f"model must be a mapping of FedDyMem options, got {type(self.model).__name__}."
            raise ValueError(msg)  # noqa: TRY004 - a config error, which the CLI reports as one

    @property
    def output_dir(self) -> Path:
        """``output`` as a path."""
        return Path(self.output)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON)."""
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the original (not output or display ones)."""
        ignored = {"output", "progress", "accelerator", "export_openvino", "keep_checkpoints", "rounds", "evaluation"}
        return {key: value for key, value in self.to_dict().items() if key not in ignored}

    def replace(self, **changes: object) -> FederationConfig:
        """A copy with ``changes`` (``None`` values are ignored: unset CLI flags)."""
        return dataclasses.replace(self, **{key: value for key, value in changes.items() if value is not None})


ConfigT = TypeVar("ConfigT")


def shipped_configs() -> Path:
    """The folder of the YAML configs shipped inside the package (``anomalib_feddymem/configs``)."""
    return Path(str(resources.files("anomalib_feddymem") / "configs"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself if it exists, else the shipped config it names.

    ``configs/federated/demo.yaml``, ``federated/demo.yaml`` and ``anomalib_feddymem/configs/...``
    all name a shipped config, so the commands of the README work from any directory and from an
    installed wheel.

    Raises:
        FileNotFoundError: neither a file nor a shipped config, listing the shipped ones.
    """
    path = Path(path)
    if path.is_file():
        return path
    parts = path.parts
    for prefix in (("anomalib_feddymem", "configs"), ("configs",)):
        if parts[: len(prefix)] == prefix:
            parts = parts[len(prefix) :]
            break
    shipped = shipped_configs().joinpath(*parts) if parts else None
    if shipped is not None and shipped.is_file():
        return shipped
    names = sorted(str(p.relative_to(shipped_configs())) for p in shipped_configs().rglob("*.yaml"))
    msg = f"Config file not found: {path} (neither a file nor a shipped config; shipped: {names})."
    raise FileNotFoundError(msg)


def read_options(path: str | Path, known: set[str]) -> tuple[Path, dict[str, Any]]:
    """The resolved path and the top-level mapping of a YAML config, refusing keys not in ``known``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a mapping, or an unknown key (naming the file and the known keys).
    """
    path = resolve_config_path(path)
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        msg = f"{path}: expected a mapping of options at the top level."
        raise ValueError(msg)  # noqa: TRY004 - a config error, which the CLI reports as one
    unknown = sorted(set(loaded) - known)
    if unknown:
        msg = f"{path}: unknown option(s) {unknown}; known: {sorted(known)}."
        raise ValueError(msg)
    return path, loaded


def load_dataclass_config(cls: type[ConfigT], path: str | Path | None = None, **overrides: object) -> ConfigT:
    """Read a YAML file of ``cls``'s fields, apply non-``None`` overrides and build ``cls``.

    ``model`` (a mapping of FedDyMem options) is merged key by key rather than replaced. Shared by
    the federation and the benchmark configs.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown key or a bad value, naming the file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path, loaded = read_options(path, {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        values.update(loaded)
    model_overrides = overrides.pop("model", None) or {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    values["model"] = {**values.get("model", {}), **model_overrides}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        where = f"{path}: " if path is not None else ""
        msg = f"{where}{error}"
        raise ValueError(msg) from error


def load_config(path: str | Path | None = None, **overrides: object) -> FederationConfig:
    """Read a YAML config (keys of :class:`FederationConfig`) and apply non-``None`` overrides."""
    return load_dataclass_config(FederationConfig, path, **overrides)


#: Flower run-config keys ([tool.flwr.app.config] in pyproject.toml) -> FederationConfig fields.
RUN_CONFIG_KEYS = {
    "num-server-rounds": "rounds",
    "local-epochs": "local_epochs",
    "data-root": "data_root",
    "datasets": "datasets",
    "num-clients": "clients",
    "partition": "partition",
    "alpha": "alpha",
    "seed": "seed",
    "min-clients": "min_clients",
    "image-size": "image_size",
    "batch-size": "batch_size",
    "output": "output",
    "export-openvino": "export_openvino",
}
#: Run-config keys that are FedDyMem model options.
RUN_CONFIG_MODEL_KEYS = {"backbone": "backbone", "pre-trained": "pre_trained"}


def from_run_config(run_config: Mapping[str, Any]) -> FederationConfig:
    """The :class:`FederationConfig` of a Flower run (``flwr run --run-config 'k=v ...'``).

    With a non-empty ``config-file`` (a YAML like ``configs/federated/*.yaml``, read on every
    machine), that file gives every setting except ``output``; otherwise the run-config keys do,
    ``model`` being a YAML mapping of further FedDyMem options (``"{memory_size: 512}"``).
    """
    config_file = str(run_config.get("config-file", "") or "")
    if config_file:
        output = run_config.get("output") or None
        return load_config(config_file, output=output, progress=False)
    values: dict[str, Any] = {
        field_name: run_config[key] for key, field_name in RUN_CONFIG_KEYS.items() if key in run_config
    }
    for key in ("output", "datasets", "data_root"):  # "" means: the default
        if values.get(key) in {"", None}:
            values.pop(key, None)
    model = yaml.safe_load(str(run_config.get("model", "") or "")) or {}
    if not isinstance(model, dict):
        msg = f"run config 'model' must be a YAML mapping of FedDyMem options, got {run_config.get('model')!r}."
        raise ValueError(msg)  # noqa: TRY004 - a config error, which the CLI reports as one
    for key, option in RUN_CONFIG_MODEL_KEYS.items():
        if key in run_config and option not in model:
            model[option] = run_config[key]
    return load_config(None, progress=False, model=model, **values)
