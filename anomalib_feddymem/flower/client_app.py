"""Flower ``ClientApp``: the client step on this SuperNode's data.

A SuperNode says in its ``--node-config`` which data it holds:

* ``data-path='/data/site_a'``: its own MVTec-layout folder, or a folder of them (one product
  each). It reads nothing else; the server assigns it a client id (``partition-id`` may fix one).
* ``partition-id=i num-partitions=N``: partition ``i`` of the products that the run config names
  under one shared ``data-root`` (simulations on one machine).

Flower runs each message in a fresh ClientApp process, so each message rebuilds the client (model
seeded exactly as in the simulation) and restores its state from ``context.state``: the node
behaves like the simulation's persistent client. What a rebuild can skip, it does: the images are
opened and checked only when the node's files changed since they last were (a fingerprint of
names, sizes and modification times kept in ``context.state``). Training data never leaves the node.

After each round the node also writes its client's state under its own output
(``state/round_<r>.pt``): a resumed run (``resume=true``) is a new Flower run with an empty
``context.state``, and each node continues from its own file of the server's last checkpointed
round. The state stays on the site, like its data.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from anomalib_feddymem.federation.config import FederationConfig, from_run_config

if TYPE_CHECKING:  # torch/anomalib are imported by the handlers that need them, not by `query`
    from anomalib_feddymem.federation.client import FedDyMemClient

logger = logging.getLogger(__name__)

__all__ = ["app", "data_fingerprint", "load_client", "node_output", "state_file"]

STATE_MODEL = "feddymem-model"
STATE_META = "feddymem-meta"
STATE_DATA = "feddymem-data"

app = ClientApp()


#: The partition id a site-mode node reports when its node config does not fix one.
UNASSIGNED = -1


def _data_path(context: Context) -> str | None:
    """The site's own data (``data-path`` in its node config), or ``None`` in partition mode."""
    path = str(context.node_config.get("data-path", "") or "")
    return path or None


def _node_config(context: Context, config: FederationConfig) -> int:
    """This node's partition id, checked against the run's number of clients.

    A site-mode node (``data-path``) without ``partition-id`` reports :data:`UNASSIGNED`.
    """
    if "partition-id" not in context.node_config:
        if _data_path(context) is not None:
            return UNASSIGNED
        msg = (
            "SuperNode's --node-config names no data: give 'data-path' (this site's folder, e.g. "
            '"data-path=\'/data/site_a\'") or a partition of the run\'s data-root ("partition-id=0 num-partitions=2").'
        )
        raise ValueError(msg)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", config.clients))
    if num_partitions != config.clients or not 0 <= partition_id < config.clients:
        msg = (
            f"Node config partition-id={partition_id} num-partitions={num_partitions} does not fit the run's "
            f"num-clients={config.clients}."
        )
        raise ValueError(msg)
    return partition_id


def _data_folders(config: FederationConfig, data_path: str | None) -> list[Path]:
    """The folders this node reads: its ``data-path``, or the run's product folders of ``data-root``."""
    if data_path is not None:
        path = Path(data_path)
        return [path.parent if path.is_file() else path]
    if config.data_root is None:
        return []  # generated synthetic data
    return [Path(config.data_root) / entry for entry in config.datasets if isinstance(entry, str)]


def data_fingerprint(folders: list[Path]) -> str:
    """A digest of the names, sizes and modification times of every file under ``folders``."""
    digest = hashlib.sha256()
    for folder in folders:
        for file in sorted(folder.rglob("*")) if folder.is_dir() else ():
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def node_output(context: Context, config: FederationConfig, client_id: int) -> Path:
    """This node's own folder: ``output`` of its node config, else the run's output per client."""
    return Path(str(context.node_config.get("output", "") or config.output_dir / f"client_{client_id}"))


def state_file(output: Path, round_number: int) -> Path:
    """Where a node keeps its client's state after ``round_number``."""
    return output / "state" / f"round_{round_number:03d}.pt"


def load_client(context: Context, restore_round: int = 0) -> FedDyMemClient:
    """This node's client, restored from ``context.state`` when it has trained in this run.

    Args:
        context: The node's context of this run.
        restore_round: The server's checkpointed round a resumed run continues from: a node with
            nothing in ``context.state`` (the run is new to it) loads its own state file of that
            round; a missing file is an error naming it.
    """
    from anomalib_feddymem.federation.build import build_client, build_partition, build_site_client

    config = from_run_config(context.run_config)
    partition_id = _node_config(context, config)
    data_path = _data_path(context)
    client_id = partition_id if partition_id != UNASSIGNED else context.node_id
    saved_state = state_file(node_output(context, config, client_id), restore_round)
    # each node writes (generated data, Lightning files) under its own folder
    config = config.replace(output=str(config.output_dir / f"client_{client_id}"))
    fingerprint = data_fingerprint(_data_folders(config, data_path))
    validated = STATE_DATA in context.state and context.state[STATE_DATA]["fingerprint"] == fingerprint
    if data_path is not None:
        client = build_site_client(config, client_id, data_path, check_images=not validated)
    else:
        _, _, datamodules = build_partition(config, save=False, check_images=not validated)
        client = build_client(config, partition_id, datamodules[partition_id])
    context.state[STATE_DATA] = ConfigRecord({"fingerprint": fingerprint})
    if STATE_MODEL in context.state:
        state = context.state[STATE_MODEL].to_torch_state_dict()
        client.load_state_dict({"model": state, "memory_round": int(context.state[STATE_META]["memory-round"])})
    elif restore_round > 0:
        import torch

        if not saved_state.is_file():
            msg = (
                f"Cannot resume client {client_id} after round {restore_round}: this node has no saved state "
                f"{saved_state} (start it with the node config and output of the interrupted run)."
            )
            raise FileNotFoundError(msg)
        client.load_state_dict(torch.load(saved_state, map_location="cpu", weights_only=True))
        logger.info("Resumed client %d from %s.", client_id, saved_state)
    return client


def _save(client: FedDyMemClient, context: Context, round_number: int | None = None) -> None:
    """Keep the client's state in ``context.state``; with ``round_number`` also in the node's file."""
    state = client.state_dict()
    context.state[STATE_MODEL] = ArrayRecord(torch_state_dict=state["model"])
    context.state[STATE_META] = ConfigRecord({"memory-round": state["memory_round"]})
    if round_number is not None:
        import torch

        path = state_file(node_output(context, from_run_config(context.run_config), client.client_id), round_number)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        for old in sorted(path.parent.glob("round_*.pt"))[:-2]:  # the last two rounds are enough to resume
            old.unlink()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (:data:`UNASSIGNED` for a site without one)."""
    config = from_run_config(context.run_config)
    partition_id = _node_config(context, config)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Client step: local epochs against ``G``, dynamic memory, memory-reduce; reply with the upload."""
    from anomalib_feddymem.federation.client import handle_train

    client = load_client(context, int(msg.content["config"].get("restore-round", 0)))
    content = handle_train(client, msg.content)
    _save(client, context, int(msg.content["config"]["round"]))  # the round's state, until evaluate adds G
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Install this round's ``G`` and report rank-based AUROCs on this node's test images."""
    from anomalib_feddymem.federation.client import handle_evaluate

    client = load_client(context, int(msg.content["config"].get("restore-round", 0)))
    content = handle_evaluate(client, msg.content)
    round_number = int(msg.content["config"]["round"])
    _save(client, context, round_number)
    config = from_run_config(context.run_config)
    if round_number == config.rounds:
        _keep_final_model(client, context, config)
    return Message(content, reply_to=msg)


def _keep_final_model(client: FedDyMemClient, context: Context, config: FederationConfig) -> None:
    """After the last round the site keeps its model: a Lightning checkpoint, and OpenVINO if asked."""
    output = node_output(context, config, client.client_id)
    checkpoint = client.save_checkpoint(output / "final" / "model.ckpt")
    logger.info("Kept the final model in %s.", checkpoint)
    if config.export_openvino:
        logger.info("Exported it to %s.", client.export_openvino(output / "final" / "openvino", config.image_size))
