"""In-process simulation, the embedded default: every client lives in this process.

``feddymem simulate --config anomalib_feddymem/configs/federated/synthetic.yaml`` and :func:`simulate` build the
products (the embedded synthetic dataset, or MVTec-layout folders), partition them, create one
persistent :class:`~anomalib_feddymem.federation.client.FedDyMemClient` per client and run the
shared round loop over :class:`InProcessTransport`, which passes the same Flower records a real
deployment sends.

Example:
    >>> from anomalib_feddymem.federation import FederationConfig, simulate
    >>> result = simulate(FederationConfig(clients=2, rounds=2, image_size=64))  # doctest: +SKIP
    >>> result.output / "metrics.csv"  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from rich.console import Console

from anomalib_feddymem.data import generate_synthetic_dataset

from .checkpoint import Checkpointer
from .client import FedDyMemClient, build_model, handle_evaluate, handle_train
from .config import FederationConfig
from .datamodules import client_datamodules, folder_products, product_sizes
from .partition import ClientPartition, partition_indices, save_partition_summary
from .runner import ClientFailure, FederationResult, run_federation

logger = logging.getLogger(__name__)

__all__ = ["InProcessTransport", "build_clients", "build_partition", "simulate"]


def product_datamodules(config: FederationConfig) -> dict[str, Any]:
    """The products' anomalib datamodules: folders of ``data_root``, or the generated synthetic set."""
    if config.data_root is None:
        root = config.output_dir / "data" / "synthetic"
        generate_synthetic_dataset(root, config.datasets, image_size=config.image_size, seed=config.seed, **config.synthetic)
        return folder_products(root, config.datasets, seed=config.seed)
    return folder_products(config.data_root, config.datasets, seed=config.seed)


def build_partition(config: FederationConfig, *, save: bool = True) -> tuple[dict[str, Any], list[ClientPartition], list[Any]]:
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


def build_client(config: FederationConfig, client_id: int, datamodule: Any) -> FedDyMemClient:  # noqa: ANN401
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


class InProcessTransport:
    """Clients called in this process; an exception in one client is that client's failure only."""

    def __init__(self, clients: list[FedDyMemClient], *, image_size: int, console: Console | None = None) -> None:
        self.clients = {client.client_id: client for client in clients}
        self.client_ids = sorted(self.clients)
        self.image_size = image_size
        self.console = console or Console()

    def _call(self, kind: str, round_number: int, instructions: Mapping[int, RecordDict], handler: Any) -> dict:  # noqa: ANN401
        replies: dict[int, RecordDict | ClientFailure] = {}
        for index, cid in enumerate(sorted(instructions), start=1):
            client = self.clients[cid]
            self.console.print(
                f"[cyan]round {round_number}[/] · client {cid} ({index}/{len(instructions)}) · {kind} "
                f"({client.num_train} train / {client.num_test} test images)"
            )
            try:
                replies[cid] = handler(client, instructions[cid])
            except Exception as error:  # noqa: BLE001 - one client's failure must not stop the round
                logger.exception("Client %d failed in %s of round %d.", cid, kind, round_number)
                replies[cid] = ClientFailure(f"{type(error).__name__}: {error}")
        return replies

    def train(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """Local training of every client."""
        return self._call("train", round_number, instructions, handle_train)

    def evaluate(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """Evaluation of every client on its own test images."""
        return self._call("evaluate", round_number, instructions, handle_evaluate)

    def client_states(self) -> dict[int, dict[str, Any]]:
        """Each client's state, checkpointed with the server's."""
        return {cid: client.state_dict() for cid, client in self.clients.items()}

    def restore(self, folder: Path) -> None:
        """Load each client's own state from a checkpoint folder."""
        for cid, client in self.clients.items():
            client.load_state_dict(Checkpointer.load_client(folder, cid))

    def export(self, export_root: Path) -> dict[int, Path]:
        """OpenVINO IR of every client's final model under ``export_root/client_<id>``."""
        return {
            cid: client.export_openvino(export_root / f"client_{cid}", self.image_size)
            for cid, client in self.clients.items()
        }


def simulate(config: FederationConfig, *, resume: bool = False, console: Console | None = None) -> FederationResult:
    """Run the federation of ``config`` in this process (``resume`` continues from its checkpoint)."""
    console = console or Console()
    clients = build_clients(config)
    transport = InProcessTransport(clients, image_size=config.image_size, console=console)
    return run_federation(transport, config, resume=resume, console=console)
