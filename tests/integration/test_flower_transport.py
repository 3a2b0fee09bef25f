"""The ServerApp's transport against a stand-in Flower grid: which partitions count as clients.

The grid answers ``query`` from node configs and ``train``/``evaluate`` by running a real client
step in this process, so the whole round loop runs; what the SuperLink processes add is tested
in ``test_flower.py``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from anomalib_feddymem.federation.config import FederationConfig
from anomalib_feddymem.federation.server import FederationError
from anomalib_feddymem.flower.server_app import FlowerTransport
from flwr.app import ConfigRecord, MetricRecord, RecordDict

if TYPE_CHECKING:
    from collections.abc import Iterable

    from anomalib_feddymem.federation.client import FedDyMemClient
    from flwr.app import Message

MODEL = {"memory_ratio": 1.0, "memory_size": 64, "global_memory_size": 48, "reduce_ratio": 2,
         "embedding_dim": 32, "upload_precision": "float32"}  # fmt: skip


@dataclass
class _Meta:
    src_node_id: int


@dataclass
class _Error:
    reason: str


@dataclass
class _Reply:
    src: int
    content: RecordDict | None = None
    error: _Error | None = None
    metadata: _Meta = field(init=False)

    def __post_init__(self) -> None:
        self.metadata = _Meta(self.src)

    def has_error(self) -> bool:
        return self.error is not None


class _Grid:
    """Nodes by id: a partition id they report (or a query error), and the client they run."""

    def __init__(self, nodes: dict[int, int | str], clients: dict[int, FedDyMemClient]) -> None:
        self.nodes, self.clients = nodes, clients

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[_Reply]:
        from anomalib_feddymem.federation.client import handle_evaluate, handle_train

        del timeout
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            held = self.nodes[node]
            if isinstance(held, str):
                replies.append(_Reply(node, error=_Error(held)))
            elif kind == "query":
                replies.append(_Reply(node, RecordDict({"metrics": MetricRecord({"partition-id": held})})))
            else:
                handler = handle_train if kind == "train" else handle_evaluate
                replies.append(_Reply(node, handler(self.clients[held], message.content)))
        return replies


@pytest.fixture(autouse=True)
def _inside_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower creates messages for the current run, as a ServerApp process has one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)  # the ServerApp's own node id
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _config(output: Path, **changes: object) -> FederationConfig:
    return FederationConfig(datasets=["stripes", "disc"], clients=2, partition="category", rounds=1, image_size=64,
                            batch_size=4, output=str(output), progress=False, model=MODEL,
                            synthetic={"train_per_product": 6, "test_good_per_product": 2, "test_defect_per_type": 2},
                            **changes)  # fmt: skip


@pytest.mark.slow
def test_a_partition_no_node_holds_is_a_failed_client_with_the_nodes_reason(tmp_path: Path) -> None:
    from anomalib_feddymem.federation.build import build_clients
    from anomalib_feddymem.federation.runner import run_federation

    config = _config(tmp_path, min_clients=1)
    clients = build_clients(config)
    grid = _Grid({11: 0, 12: "ValueError: SuperNode has no 'partition-id' in its --node-config"}, {0: clients[0]})
    transport = FlowerTransport(grid, config, connect_timeout=1)
    assert transport.client_ids == [0, 1]
    run_federation(transport, config)
    with (tmp_path / "metrics.csv").open() as file:
        rows = {row["client"]: row for row in csv.DictReader(file)}
    assert set(rows) == {"0", "1"}
    assert rows["0"]["status"] == "ok"
    assert rows["1"]["status"].startswith("failed: no SuperNode holds partition 1 (node(s) failed the query: node 12:")
    assert "no 'partition-id'" in rows["1"]["status"]


def test_no_node_holding_a_partition_stops_the_round_naming_each_partition_and_node(tmp_path: Path) -> None:
    config = _config(tmp_path, min_clients=2)
    reason = "ValueError: SuperNode has no 'partition-id' in its --node-config"
    transport = FlowerTransport(_Grid({11: reason, 12: reason}, {}), config, connect_timeout=1)
    from anomalib_feddymem.federation.runner import run_federation

    with pytest.raises(FederationError) as error:
        run_federation(transport, config)
    text = str(error.value)
    assert "only 0 of 2 clients replied" in text
    for partition, node in ((0, 11), (1, 11), (1, 12)):
        assert f"client {partition}: no SuperNode holds partition {partition}" in text
        assert f"node {node}: {reason}" in text


class _AppGrid:
    """Every node runs this package's real ClientApp handlers with its own node config and state."""

    def __init__(self, node_configs: dict[int, dict[str, object]], run_config: dict[str, object]) -> None:
        from flwr.app import Context

        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config=run_config)
            for node, config in node_configs.items()
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[_Reply]:
        from anomalib_feddymem.flower import client_app

        del timeout
        handlers = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            try:
                reply = handlers[message.metadata.message_type](message, self.contexts[node])
            except Exception as error:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                replies.append(_Reply(node, error=_Error(f"{type(error).__name__}: {error}")))
            else:
                replies.append(_Reply(node, reply.content))
        return replies


@pytest.mark.slow
def test_sites_with_their_own_data_federate_and_an_empty_site_fails_naming_its_path(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three SuperNodes name only their own folders (``data-path``); the server holds no data."""
    from anomalib_feddymem.federation import build
    from anomalib_feddymem.federation.config import from_run_config
    from anomalib_feddymem.federation.runner import run_federation

    site_a = synthetic_root / "stripes"  # one MVTec-layout folder
    site_b = tmp_path / "site_b"  # a folder of them
    site_b.mkdir()
    for name in ("disc", "grain"):
        (site_b / name).symlink_to(synthetic_root / name)
    site_c = tmp_path / "site_c"  # no usable training image
    (site_c / "train" / "good").mkdir(parents=True)
    (site_c / "test" / "good").mkdir(parents=True)
    read: list[Path] = []
    named_products = build.named_products
    monkeypatch.setattr(build, "named_products", lambda names, root, **kw: read.extend(Path(root) / n for n in names)
                        or named_products(names, root, **kw))  # fmt: skip

    checks: list[tuple[str, bool]] = []
    build_site_client = build.build_site_client

    def spy(config: object, client_id: int, data_path: str, *, check_images: bool = True) -> object:
        checks.append((Path(data_path).name, check_images))
        return build_site_client(config, client_id, data_path, check_images=check_images)

    monkeypatch.setattr(build, "build_site_client", spy)
    run_config = {"num-clients": 3, "num-server-rounds": 1, "min-clients": 2, "image-size": 64, "batch-size": 4,
                  "seed": 0, "output": str(tmp_path / "run"), "model": str(MODEL), "export-openvino": True}  # fmt: skip
    grid = _AppGrid(
        {21: {"data-path": str(site_a)}, 22: {"data-path": str(site_b)}, 23: {"data-path": str(site_c)}}, run_config
    )
    config = from_run_config(run_config)
    transport = FlowerTransport(grid, config, connect_timeout=1)
    assert transport.nodes == {0: 21, 1: 22, 2: 23}  # ids for sites in node-id order
    result = run_federation(transport, config)
    with (tmp_path / "run" / "metrics.csv").open() as file:
        rows = {row["client"]: row for row in csv.DictReader(file)}
    assert rows["0"]["status"] == "ok"
    assert rows["1"]["status"] == "ok"
    # each site trained on its own training images only

    def train_count(*folders: Path) -> int:
        return sum(len(list((folder / "train" / "good").iterdir())) for folder in folders)

    assert int(rows["0"]["train_images"]) == train_count(site_a)
    assert int(rows["1"]["train_images"]) == train_count(site_b / "disc", site_b / "grain")
    assert rows["2"]["status"].startswith("failed:")
    assert str(site_c) in rows["2"]["status"]
    assert result.global_memory.shape[0] > 0
    assert set(read) >= {site_a, site_b / "disc", site_b / "grain"}
    assert all(path in {site_a, site_b / "disc", site_b / "grain", site_c} for path in read), read
    # after the last round each site keeps its model: a checkpoint anomalib loads, and OpenVINO
    from anomalib_feddymem import FedDyMem

    for node in (21, 22):
        final = tmp_path / "run" / f"client_{node}" / "final"
        kept = FedDyMem.load_from_checkpoint(final / "model.ckpt", map_location="cpu")
        assert kept.model.memory.shape == result.global_memory.shape
        assert (final / "openvino" / "weights" / "openvino" / "model.xml").is_file()
    assert not (tmp_path / "run" / "client_23" / "final").exists()
    # a node opens its images once: its evaluate message found its files unchanged since train
    assert ("stripes", True) in checks
    assert ("stripes", False) in checks
    assert ("site_c", False) not in checks  # never validated, so checked again on every message


class _BusyGrid(_Grid):
    """Node 12 ignores its first ``busy`` queries (busy with another run's message); ``train`` replies are empty."""

    def __init__(self, busy: int) -> None:
        super().__init__({11: 0, 12: 1}, {})
        self.busy = busy
        self.queries: list[int] = []

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[_Reply]:
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            if kind != "query":
                replies.append(_Reply(node, RecordDict()))
                continue
            self.queries.append(node)
            if node == 12 and self.queries.count(12) <= self.busy:
                continue  # no reply within the timeout
            replies.extend(super().send_and_receive([message], timeout))
        return replies


def _train(transport: FlowerTransport) -> dict:
    return transport.train(1, {cid: RecordDict({"config": ConfigRecord({})}) for cid in transport.client_ids})


def test_a_node_that_did_not_answer_the_query_is_asked_again_before_the_round(tmp_path: Path) -> None:
    from anomalib_feddymem.federation.runner import ClientFailure

    grid = _BusyGrid(busy=1)
    transport = FlowerTransport(grid, _config(tmp_path), timeout=5, connect_timeout=1)
    assert transport.nodes == {0: 11}
    replies = _train(transport)
    assert grid.queries == [11, 12, 12]  # the connected, already answered node 11 is not asked again
    assert transport.nodes == {0: 11, 1: 12}
    assert not any(isinstance(reply, ClientFailure) for reply in replies.values()), replies
    _train(transport)
    assert grid.queries == [11, 12, 12], "a node that answered is not asked again"


def test_a_node_that_never_answers_the_query_fails_its_partition_naming_the_node_and_the_wait(tmp_path: Path) -> None:
    from anomalib_feddymem.federation.runner import ClientFailure

    grid = _BusyGrid(busy=10)
    transport = FlowerTransport(grid, _config(tmp_path), timeout=5, connect_timeout=1)
    for _ in range(2):
        replies = _train(transport)
        assert isinstance(replies[1], ClientFailure)
        assert "partition 1 (no answer to the query from node 12 within 5s: restart" in replies[1].reason
    assert grid.queries == [11, 12, 12, 12]
