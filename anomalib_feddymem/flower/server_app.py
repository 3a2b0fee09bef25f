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

from anomalib_feddymem.federation.checkpoint import Checkpointer
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

    Nodes are asked which partition they hold (a ``query`` message) when the run starts and,
    before every round, any node that connected since or has not answered yet: a SuperNode
    restarted after a crash takes its partition back in the next round, and so does one that was
    still busy with an earlier run's message when this run asked (after ``flwr stop`` and a
    resume, for instance).

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
        self.clients = config.clients
        #: Node id -> why it failed the query (it then holds no partition).
        self.query_failures: dict[int, str] = {}
        #: Node id -> the seconds it was given to answer the query, for nodes that have not answered.
        self.unanswered: dict[int, float] = {}
        #: Client id -> node id.
        self.nodes: dict[int, int] = {}
        self.queried: set[int] = set()
        #: The checkpointed round a resumed run continues from (sent with its first instructions).
        self.restore_round = 0
        self._discover(connect_timeout)
        # Every partition of the run is a client, held by a node or not: a partition without a
        # SuperNode is a failed client of every round, never a missing row.
        self.client_ids = list(range(config.clients))

    def _discover(self, connect_timeout: float) -> None:
        """Wait for ``clients`` nodes, then ask each which partition it holds."""
        deadline = time.monotonic() + connect_timeout
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < self.clients and time.monotonic() < deadline:
            time.sleep(1)
            node_ids = list(self.grid.get_node_ids())
        if len(node_ids) < self.clients:
            msg = (
                f"Only {len(node_ids)} SuperNode(s) connected within {connect_timeout:.0f}s; "
                f"num-clients={self.clients}."
            )
            raise FederationError(msg)
        self._query(node_ids, connect_timeout)
        missing = sorted(set(range(self.clients)) - set(self.nodes))
        if missing:
            logger.warning("No SuperNode holds partition(s) %s; they count as failed clients until one answers "
                           "for them (%s).", missing, self._unheld_reason())  # fmt: skip
        logger.info("SuperNodes by partition id: %s", self.nodes)

    def _query(self, node_ids: list[int], timeout: float, *, rejoining: bool = False) -> None:
        """Ask ``node_ids`` which partition they hold and give each its client id.

        A node with its own data and no fixed ``partition-id`` (a site) gets a client id no
        connected node holds, in node-id order (stable across rounds). At the start two nodes
        claiming one partition are an error; later (``rejoining``) the newer node takes it over,
        as a restarted SuperNode connects before the SuperLink has noticed its old self is gone.
        """
        self.queried.update(node_ids)
        messages = [Message(RecordDict({"config": ConfigRecord({})}), node, "query") for node in node_ids]
        connected = set(self.grid.get_node_ids())
        sites: list[int] = []
        self.unanswered.update(dict.fromkeys(node_ids, timeout))
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            self.unanswered.pop(node, None)
            if reply.has_error():
                self.query_failures[node] = reply.error.reason
                logger.warning("Node %s failed the query: %s", node, reply.error.reason)
                continue
            partition_id = int(reply.content["metrics"]["partition-id"])
            if partition_id < 0:
                sites.append(node)
                continue
            holder = self.nodes.get(partition_id)
            if holder is not None and holder in connected and not rejoining:
                msg = f"Two SuperNodes hold partition-id={partition_id} (nodes {holder} and {node}): give each its own."
                raise FederationError(msg)
            if holder is not None:  # a restarted node: its old self may not be known as gone yet
                logger.warning(
                    "Node %s holds partition %d from now on, in place of node %s.", node, partition_id, holder
                )
            self.nodes[partition_id] = node
        free = (cid for cid in range(self.clients) if self.nodes.get(cid) not in connected)
        for node in sorted(sites):
            cid = next(free, None)
            if cid is None:
                logger.warning("Node %s is a site beyond num-clients=%d; it takes no part.", node, self.clients)
                continue
            self.nodes[cid] = node

    def _rejoin(self) -> None:
        """Query the nodes that connected since the last query or have not answered one yet."""
        connected = set(self.grid.get_node_ids())
        new = sorted(connected - self.queried)
        if new:
            logger.info("New SuperNode(s) %s connected; asking which partition they hold.", new)
            self._query(new, self.timeout, rejoining=True)
        silent = sorted(connected & set(self.unanswered))
        if silent:  # the same nodes as at the start: two claiming one partition is still an error
            logger.info("SuperNode(s) %s did not answer the query yet; asking them again.", silent)
            self._query(silent, self.timeout)

    def _send(self, kind: str, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        if kind == "train":
            self._rejoin()
        replies: dict[int, RecordDict | ClientFailure] = {}
        connected = set(self.grid.get_node_ids())
        by_node = {self.nodes[cid]: cid for cid in instructions if cid in self.nodes}
        messages = []
        for cid, content in instructions.items():
            if cid not in self.nodes:
                continue
            if self.nodes[cid] not in connected:  # nothing would answer: fail now, not after the timeout
                node = self.nodes[cid]
                replies[cid] = ClientFailure(f"node {node} is not connected (it stopped or lost its connection)")
                continue
            if kind == "train" and self.restore_round:
                content["config"]["restore-round"] = self.restore_round
            messages.append(Message(content, self.nodes[cid], kind, group_id=str(round_number)))
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            cid = by_node.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                node = reply.metadata.src_node_id
                replies[cid] = ClientFailure(f"error on node {node}: {reply.error.reason}")
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
        """Why a partition has no node: the nodes that failed or did not answer the query."""
        reasons = []
        if self.query_failures:
            failed = "; ".join(f"node {node}: {reason}" for node, reason in sorted(self.query_failures.items()))
            reasons.append(f"node(s) failed the query: {failed}")
        if self.unanswered:
            silent = "; ".join(f"node {node} within {wait:.0f}s" for node, wait in sorted(self.unanswered.items()))
            reasons.append(f"no answer to the query from {silent}: restart a SuperNode that stays silent")
        return "; ".join(reasons) or "no connected node reported it"

    def train(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """``train`` messages to the clients' nodes (after a resume, naming the round to restore)."""
        replies = self._send("train", round_number, instructions)
        self.restore_round = 0  # the nodes hold their restored state in this run's context now
        return replies

    def evaluate(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """``evaluate`` messages to the clients' nodes."""
        return self._send("evaluate", round_number, instructions)

    def client_states(self) -> dict:  # noqa: PLR6301 - the Transport protocol's method
        """Nothing: SuperNodes keep their clients' state themselves (``state/round_<r>.pt``)."""
        return {}

    def restore(self, folder: Path) -> None:
        """Resume after the round checkpointed in ``folder``: each node loads its own state of that round."""
        self.restore_round = Checkpointer.round_of(folder)

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
    result = run_federation(transport, config, resume=bool(context.run_config.get("resume", False)))
    logger.info(
        "Federation finished: G has %d items; metrics in %s.", len(result.global_memory), result.output / "metrics.csv"
    )
