"""Faults on a real deployment: a real ``flower-superlink`` and ``flower-supernode`` processes on 127.0.0.1.

* A SuperNode killed with SIGKILL in the middle of a round fails that round (the server names it,
  ``metrics.csv`` marks it) while the others complete it; restarted, it takes its partition back
  in the next round.
* A run stopped after round 2 of 3 and started again with ``resume=true`` ends with the global
  memory of an uninterrupted run: the server continues from its checkpoint, each node from its
  own saved state of that round. A node still busy with the stopped run's round when the resumed
  run asks for its partition is asked again before the round.
* ``flwr run`` exits 0 whatever the ServerApp did; ``flwr ls --run-id`` shows a run's final status.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from flower_processes import REPO, FlowerProcesses, run_config_overrides, synthetic_products, tiny_run_config

if TYPE_CHECKING:
    import subprocess

pytestmark = pytest.mark.slow

#: Three rounds (a fault in round 2, a stop after it); two clients complete a round.
FAULT_RUN = {"num-server-rounds": 3, "min-clients": 2, "round-timeout": 300}


def _wait_for(condition, what: str, flower: FlowerProcesses, timeout: float = 600, *, run_ends: bool = False) -> None:
    """Wait for ``condition``; fail at once if the ``flwr run`` process ends first (unless ``run_ends``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        run = flower.processes.get("run")
        if not run_ends and run is not None and run.poll() is not None and not condition():
            pytest.fail(f"the run ended before {what}:\n{flower.log_tail()}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}:\n{flower.log_tail()}")


def _start_run(flower: FlowerProcesses, run_config: dict[str, object]) -> None:
    flower.start("run", "flwr", "run", str(REPO), "loopback", "--stream", "--run-config",
                 run_config_overrides(run_config))  # fmt: skip


def _run_log(flower: FlowerProcesses) -> str:
    path = flower.logs / "run.log"
    return path.read_text() if path.is_file() else ""


def _rows(output: Path) -> dict[tuple[int, int], str]:
    with (output / "metrics.csv").open() as file:
        return {(int(row["round"]), int(row["client"])): row["status"] for row in csv.DictReader(file)}


def test_killed_supernode_fails_its_round_and_rejoins_after_restart(tmp_path: Path) -> None:
    products = ["stripes", "disc", "checker"]
    data = synthetic_products(tmp_path / "data", products)
    output = tmp_path / "out"
    flower = FlowerProcesses(tmp_path)
    try:
        flower.superlink()
        nodes = {p: flower.supernode(f"supernode_{p}", f"partition-id={p} num-partitions=3") for p in range(3)}
        _start_run(flower, tiny_run_config(data, output, products, **FAULT_RUN))
        _wait_for(lambda: "Round 2/3" in _run_log(flower), "round 2 to start", flower)
        os.killpg(nodes[2].pid, signal.SIGKILL)  # the SuperNode and the ClientApp it runs, mid-round
        nodes[2].wait(timeout=30)
        flower.supernode("supernode_2_restarted", "partition-id=2 num-partitions=3")
        assert flower.processes["run"].wait(timeout=900) == 0, flower.log_tail()
    finally:
        flower.stop_all()
    rows = _rows(output)
    log = _run_log(flower)
    assert [rows[1, c] for c in range(3)] == ["ok", "ok", "ok"], log
    assert rows[2, 0] == rows[2, 1] == "ok", log
    assert rows[2, 2].startswith("failed: "), log
    assert re.search(r"node \d+", rows[2, 2]), f"the failure names the node: {rows[2, 2]}"
    assert "client 2: " in log, "the server log names the failed client and its reason"
    assert [rows[3, c] for c in range(3)] == ["ok", "ok", "ok"], f"the restarted node rejoins round 3\n{log}"


def _clientapp_running(supernode: subprocess.Popen) -> bool:
    """Whether a ``flwr-clientapp`` of this SuperNode (its process group) is alive (Linux ``/proc``)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == supernode.pid and fields[0] != "Z" and b"flwr-clientapp" in command:
            return True
    return False


def _idle(flower: FlowerProcesses, node: str) -> bool:
    """Whether a SuperNode has answered (or dropped) every message it pulled and runs no ClientApp.

    A message pulled as the run stops is logged ``Ignoring message`` and yet, stored before the
    SuperLink refused its receipt, still runs (Flower 1.42): it counts as done only once its
    ClientApp has replied (``Ignoring reply message``). Hence the ClientApp launches are matched
    with the replies, and the process table is checked too, twice a few seconds apart, so that a
    ClientApp about to start is not missed.
    """

    def settled() -> bool:
        log = (flower.logs / f"{node}.log").read_text()
        replies = log.count("Sending: ")
        answered = log.count("Receiving: ") <= replies + log.count("Ignoring message ")
        launches_replied = log.count("Start `flwr-clientapp` process") == replies
        return answered and launches_replied and not _clientapp_running(flower.processes[node])

    if not settled():
        return False
    time.sleep(5)
    return settled()


def _run_id(flower: FlowerProcesses) -> int:
    match = re.search(r"Successfully started run (\d+)", _run_log(flower))
    assert match, flower.log_tail()
    return int(match.group(1))


def _status(flower: FlowerProcesses, run_id: int) -> str:
    listed = flower.flwr("ls", "loopback", "--run-id", str(run_id), "--format", "json", timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    (run,) = json.loads(listed.stdout)["runs"]
    return str(run["status"])


def test_stopped_run_resumes_to_the_uninterrupted_global_memory(tmp_path: Path) -> None:
    from anomalib_feddymem.federation.checkpoint import Checkpointer
    from anomalib_feddymem.federation.config import from_run_config
    from anomalib_feddymem.federation.simulation import simulate

    products = ["stripes", "disc"]
    data = synthetic_products(tmp_path / "data", products)
    output = tmp_path / "out"
    run_config = tiny_run_config(data, output, products, **FAULT_RUN)
    checkpoint = Checkpointer(output)
    flower = FlowerProcesses(tmp_path)
    try:
        flower.superlink()
        for partition in range(2):
            flower.supernode(f"supernode_{partition}", f"partition-id={partition} num-partitions=2")
        _start_run(flower, run_config)
        _wait_for(lambda: checkpoint.exists() and checkpoint.latest_file.read_text().strip() == "round_002",
                  "the checkpoint of round 2", flower)  # fmt: skip
        run_id = _run_id(flower)
        stopped = flower.flwr("stop", str(run_id), "loopback", timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        flower.processes["run"].wait(timeout=300)
        assert checkpoint.latest_file.read_text().strip() == "round_002", "round 3 ended before the stop"
        assert "stopped" in _status(flower, run_id)
        # Each node finishes the stopped run's message (Flower discards its reply) before the resume:
        # a SuperNode pulls one message at a time, and a slow host can lose the next one at that handover.
        _wait_for(lambda: all(_idle(flower, f"supernode_{p}") for p in range(2)), "the nodes to go idle", flower,
                  run_ends=True)  # fmt: skip

        resumed = flower.run_app({**run_config, "resume": True})
        assert resumed.returncode == 0, f"{resumed.stdout[-4000:]}\n{flower.log_tail()}"
        assert "Round 3/3" in resumed.stdout, resumed.stdout[-4000:]
        assert "Round 1/3" not in resumed.stdout, "the resumed run continues after round 2"
        resumed_id = re.search(r"Successfully started run (\d+)", resumed.stdout)
        assert resumed_id, resumed.stdout[-4000:]
        assert _status(flower, int(resumed_id.group(1))) == "finished:completed", flower.log_tail()

        failing = flower.run_app({**run_config, "output": str(tmp_path / "bad"), "partition": "no-such-scheme"})
        assert failing.returncode == 0, "flwr run exits 0 even when the ServerApp fails"
        match = re.search(r"Successfully started run (\d+)", failing.stdout)
        assert match, failing.stdout
        assert _status(flower, int(match.group(1))) == "finished:failed"
    finally:
        flower.stop_all()
    state, _ = checkpoint.load()
    assert state.round == 3
    assert [(r["round"], r["status"]) for r in state.rows] == [(r, "ok") for r in (1, 1, 2, 2, 3, 3)]
    simulated = simulate(from_run_config({**run_config, "output": str(tmp_path / "sim")}).replace(progress=False))
    torch.testing.assert_close(state.global_memory, simulated.global_memory, atol=1e-4, rtol=1e-4)
