"""Build clients: products, partition, datamodules and seeded models, for every runner.

The in-process simulation, the Flower ClientApp and the benchmark all build their clients here, so
a client is the same object whichever transport calls it. Two ways to know a client's data:

* a partition of shared products (:func:`build_partition`: simulations on one machine, and
  SuperNodes started with ``partition-id``);
* a site's own folder (:func:`build_site_client`: a SuperNode started with ``data-path``), which
  reads nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anomalib_feddymem.data import DatasetFolderError, generate_synthetic_dataset

from .client import FedDyMemClient, build_model
from .datamodules import client_datamodules, named_products, product_sizes
from .partition import ClientPartition, partition_indices, save_partition_summary

if TYPE_CHECKING:
    from .config import FederationConfig
    from .datamodules import ClientDataModule

__all__ = [
    "build_client",
    "build_clients",
    "build_partition",
    "build_site_client",
    "product_datamodules",
    "site_products",
]


def product_datamodules(config: FederationConfig, *, check_images: bool = True) -> dict[str, Any]:
    """The products' anomalib datamodules: ``datasets`` as folders of ``data_root`` or datamodules.

    Without ``data_root`` and with folder names only, the embedded synthetic products are
    generated under ``output/data/synthetic``.
    """
    root = config.data_root
    if root is None and all(isinstance(entry, str) for entry in config.datasets):
        root = config.output_dir / "data" / "synthetic"
        generate_synthetic_dataset(
            root, config.datasets, image_size=config.image_size, seed=config.seed, **config.synthetic
        )
    return named_products(config.datasets, root, check_images=check_images, seed=config.seed)


def _client_datamodules(
    config: FederationConfig, products: dict[str, Any], partitions: list[ClientPartition]
) -> list[ClientDataModule]:
    """The clients' datamodules with ``config``'s image size, batch size and seed."""
    return client_datamodules(
        products,
        partitions,
        image_size=config.image_size,
        train_batch_size=config.batch_size,
        eval_batch_size=config.batch_size,
        num_workers=0,
        seed=config.seed,
    )


def build_partition(
    config: FederationConfig, *, save: bool = True, check_images: bool = True
) -> tuple[dict[str, Any], list[ClientPartition], list[Any]]:
    """Products, partition and client datamodules of ``config`` (the summary saved to ``output``).

    ``check_images=False`` skips opening every image (a node whose data did not change since it
    last validated it).
    """
    products = product_datamodules(config, check_images=check_images)
    partitions = partition_indices(
        product_sizes(products), config.clients, config.partition, alpha=config.alpha, seed=config.seed
    )
    datamodules = _client_datamodules(config, products, partitions)
    if save:
        save_partition_summary(
            partitions, config.output_dir, scheme=config.partition, alpha=config.alpha, seed=config.seed
        )
    return products, partitions, datamodules


def build_client(config: FederationConfig, client_id: int, datamodule: ClientDataModule) -> FedDyMemClient:
    """One client with a freshly built (seeded) model."""
    model = build_model(config.model, image_size=config.image_size, local_epochs=config.local_epochs, seed=config.seed)
    return FedDyMemClient(
        client_id,
        model,
        datamodule,
        work_dir=config.output_dir / "clients" / f"client_{client_id}",
        progress=config.progress,
        accelerator=config.accelerator,
    )


def build_clients(config: FederationConfig) -> list[FedDyMemClient]:
    """Every client of ``config``."""
    _, _, datamodules = build_partition(config)
    return [build_client(config, cid, datamodule) for cid, datamodule in enumerate(datamodules)]


def _yaml_products(path: Path, *, seed: int, check_images: bool) -> dict[str, Any]:
    """``products:`` of a site's YAML: anomalib datamodules, or folder names beside the file."""
    import yaml

    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = loaded.get("products") if isinstance(loaded, dict) else None
    if not isinstance(entries, list) or not entries:
        msg = f"data-path {path}: expected a non-empty `products:` list (class_path/init_args or folder names)."
        raise DatasetFolderError(msg)
    return named_products(entries, path.parent, check_images=check_images, seed=seed)


def site_products(data_path: str | Path, *, seed: int = 0, check_images: bool = True) -> dict[str, Any]:
    """A site's own products, from its ``data-path``.

    The path is an MVTec-layout folder (one product), a folder of such folders, or a YAML file
    whose ``products:`` lists anomalib datamodules (``class_path``/``init_args``) or folder names.

    Raises:
        DatasetFolderError: the path is missing, holds no MVTec-layout folder, or a product has no
            usable training image (the message names the path).
    """
    path = Path(data_path)
    if path.suffix in {".yaml", ".yml"} and path.is_file():
        return _yaml_products(path, seed=seed, check_images=check_images)
    if not path.is_dir():
        msg = f"data-path {path} is not a folder (or a products YAML file) on this site."
        raise DatasetFolderError(msg)
    if (path / "train").is_dir():
        return named_products([path.name], path.parent, seed=seed, check_images=check_images)
    names = sorted(child.name for child in path.iterdir() if (child / "train").is_dir())
    if not names:
        msg = f"data-path {path} is neither an MVTec-layout folder (train/good, test/...) nor a folder of them."
        raise DatasetFolderError(msg)
    return named_products(names, path, seed=seed, check_images=check_images)


def build_site_client(
    config: FederationConfig, client_id: int, data_path: str | Path, *, check_images: bool = True
) -> FedDyMemClient:
    """The client of a site that holds ``data_path`` and nothing else: all of its training images."""
    products = site_products(data_path, seed=config.seed, check_images=check_images)
    partition = ClientPartition(client_id, {name: np.arange(size) for name, size in product_sizes(products).items()})
    (datamodule,) = _client_datamodules(config, products, [partition])
    return build_client(config, client_id, datamodule)
