"""Build clients: products, partition, datamodules and seeded models, for every runner.

The in-process simulation, the Flower ClientApp and the benchmark all build their clients here, so
a client is the same object whichever transport calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anomalib_feddymem.data import generate_synthetic_dataset

from .client import FedDyMemClient, build_model
from .datamodules import client_datamodules, folder_products, product_sizes
from .partition import ClientPartition, partition_indices, save_partition_summary

if TYPE_CHECKING:
    from .config import FederationConfig
    from .datamodules import ClientDataModule

__all__ = ["build_client", "build_clients", "build_partition", "product_datamodules"]


def product_datamodules(config: FederationConfig) -> dict[str, Any]:
    """The products' anomalib datamodules: folders of ``data_root``, or the generated synthetic set."""
    if config.data_root is None:
        root = config.output_dir / "data" / "synthetic"
        generate_synthetic_dataset(
            root, config.datasets, image_size=config.image_size, seed=config.seed, **config.synthetic
        )
        return folder_products(root, config.datasets, seed=config.seed)
    return folder_products(config.data_root, config.datasets, seed=config.seed)


def build_partition(
    config: FederationConfig, *, save: bool = True
) -> tuple[dict[str, Any], list[ClientPartition], list[Any]]:
    """Products, partition and client datamodules of ``config`` (the summary saved to ``output``)."""
    products = product_datamodules(config)
    partitions = partition_indices(
        product_sizes(products), config.clients, config.partition, alpha=config.alpha, seed=config.seed
    )
    datamodules = client_datamodules(
        products,
        partitions,
        image_size=config.image_size,
        train_batch_size=config.batch_size,
        eval_batch_size=config.batch_size,
        num_workers=0,
        seed=config.seed,
    )
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
