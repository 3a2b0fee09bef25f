"""Flower ``ServerApp``: the shared round loop over Flower messages.

:class:`FlowerTransport` maps partition ids to SuperNodes (a ``query`` message), sends ``train``
and ``evaluate`` instructions, and turns error replies and missing replies (a node that crashed
or disconnected) into client failures, which the round loop logs and tolerates down to
``min-clients``. Aggregation is the shared server step (validation + weighted k-means).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from anomalib_feddymem.federation.checkpoint import CheckpointError
from anomalib_feddymem.federation.config import FederationConfig, from_run_config
from anomalib_feddymem.federation.runner import ClientFailure, run_federation
from anomalib_feddymem.federation.server import FederationError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["FlowerTransport", "app"]

app = ServerApp()


class FlowerTransport:
    """The round loop's transport over a Flower ``Grid``.

    Args:
        grid: The ServerApp's grid.
        config: The run's settings (``clients`` nodes are awaited).
        timeout: Seconds to wait for the replies of one phase of a round.
        connect_timeout: Seconds to wait for all SuperNodes to connect.
    """

    def __init__(
        self, grid: Grid, config: FederationConfig, *, timeout: float = 3600, connect_timeout: float = 300
    ) -> None:
        self.grid = grid
        self.timeout = timeout
        #: Node id -> why it failed the query (it then holds no partition).
        self.query_failures: dict[int, str] = {}
        self.nodes = self._discover(config.clients, connect_timeout)
        # Every partition of the run is a client, held by a node or not: a partition without a
        # SuperNode is a failed client of every round, never a missing row.
        self.client_ids = list(range(config.clients))

    def _discover(self, clients: int, connect_timeout: float) -> dict[int, int]:
        """Client id -> node id, by asking every connected node which partition it holds.

        A node with its own data and no fixed ``partition-id`` (a site) gets a free id.
        """
        deadline = time.monotonic() + connect_timeout
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < clients and time.monotonic() < deadline:
            time.sleep(1)
            node_ids = list(self.grid.get_node_ids())
        if len(node_ids) < clients:
            msg = f"Only {len(node_ids)} SuperNode(s) connected within {connect_timeout:.0f}s; num-clients={clients}."
            raise FederationError(msg)
        messages = [Message(RecordDict({"config": ConfigRecord({})}), node, "query") for node in node_ids]
        nodes: dict[int, int] = {}
        sites: list[int] = []
        for reply in self.grid.send_and_receive(messages, timeout=connect_timeout):
            if reply.has_error():
                self.query_failures[reply.metadata.src_node_id] = reply.error.reason
                logger.warning("Node %s failed the query: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            partition_id = int(reply.content["metrics"]["partition-id"])
            if partition_id < 0:  # a site with its own data and no fixed id
                sites.append(reply.metadata.src_node_id)
                continue
            if partition_id in nodes:
                msg = f"Two SuperNodes hold partition-id={partition_id}: give each a different one."
                raise FederationError(msg)
            nodes[partition_id] = reply.metadata.src_node_id
        free = (cid for cid in range(clients) if cid not in nodes)
        for node in sorted(sites):  # client ids for sites, in node-id order (stable across rounds)
            cid = next(free, None)
            if cid is None:
                logger.warning("Node %s is a site beyond num-clients=%d; it takes no part.", node, clients)
                continue
            nodes[cid] = node
        missing = sorted(set(range(clients)) - set(nodes))
        if missing:
            logger.warning("No SuperNode holds partition(s) %s; they count as failed clients (%s).", missing,
                           self._unheld_reason())  # fmt: skip
        logger.info("SuperNodes by partition id: %s", nodes)
        return nodes

    def _send(self, kind: str, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        replies: dict[int, RecordDict | ClientFailure] = {}
        by_node = {self.nodes[cid]: cid for cid in instructions if cid in self.nodes}
        messages = [
            Message(content, self.nodes[cid], kind, group_id=str(round_number))
            for cid, content in instructions.items()
            if cid in self.nodes
        ]
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                replies[cid] = ClientFailure(f"error on node: {reply.error.reason}")
            else:
                replies[cid] = reply.content
        for cid in instructions:
            if cid in replies:
                continue
            if cid in self.nodes:
                reason = f"no reply from node {self.nodes[cid]} within {self.timeout:.0f}s (node disconnected?)"
            else:
                reason = f"no SuperNode holds partition {cid} ({self._unheld_reason()})"
            replies[cid] = ClientFailure(reason)
        return replies

    def _unheld_reason(self) -> str:
        """Why a partition has no node: the nodes that failed the query, with their reasons."""
        if not self.query_failures:
            return "no connected node reported it"
        failed = "; ".join(f"node {node}: {reason}" for node, reason in sorted(self.query_failures.items()))
        return f"node(s) failed the query: {failed}"

    def train(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """``train`` messages to the clients' nodes."""
        return self._send("train", round_number, instructions)

    def evaluate(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """``evaluate`` messages to the clients' nodes."""
        return self._send("evaluate", round_number, instructions)

    def client_states(self) -> dict:  # noqa: PLR6301 - the Transport protocol's method
        """Nothing: SuperNodes keep their clients' state themselves."""
        return {}

    def restore(self, folder: Path) -> None:  # noqa: PLR6301 - the Transport protocol's method
        """Flower clients cannot be rolled back from the server."""
        msg = f"--resume is for the in-process simulation; a Flower run cannot restore its clients from {folder}."
        raise CheckpointError(msg)

    def export(self, export_root: Path) -> dict:  # noqa: PLR6301 - the Transport protocol's method
        """Clients' models stay on their nodes (export them there with anomalib)."""
        del export_root
        return {}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation configured by the run config."""
    config = from_run_config(context.run_config)
    timeout = float(context.run_config.get("round-timeout", 3600))
    transport = FlowerTransport(grid, config, timeout=timeout)
    result = run_federation(transport, config)
    logger.info(
        "Federation finished: G has %d items; metrics in %s.", len(result.global_memory), result.output / "metrics.csv"
    )
