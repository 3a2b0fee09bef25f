"""Flower loopback: a real SuperLink and two SuperNodes on 127.0.0.1, two rounds via ``flwr run``.

The resulting global memory must match the in-process simulation with the same seed: both run
the same client and server steps on the same records. Everything started is stopped in the
fixture's teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PRODUCTS = ["stripes", "disc"]
MODEL = (
    "{memory_ratio: 1.0, memory_size: 64, global_memory_size: 48, reduce_ratio: 2, embedding_dim: 32, "
    "upload_precision: float32}"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"{process.args[0]} exited with {process.returncode} before listening on {port}"
            raise RuntimeError(msg)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    msg = f"nothing listens on 127.0.0.1:{port} after {timeout}s"
    raise TimeoutError(msg)


def _stop(process: subprocess.Popen) -> None:
    """Stop one process we started (and its process group: the apps it spawned)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture
def loopback(tmp_path):
    """SuperLink + 2 SuperNodes on free loopback ports; yields (connection env, log folder)."""
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flower-superlink is not installed next to this Python")
    link_port = _free_port()
    flwr_home = tmp_path / "flwr_home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n'
        f'[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns its own executables
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = (logs / f"{name}.log").open("w")
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
        processes.append(process)
        return process

    try:
        link = start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port))
        _wait_for_port(link_port, link)
        for partition in range(2):
            node_port = _free_port()
            node = start(
                f"supernode_{partition}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(node_port),
                "--node-config",
                f"partition-id={partition} num-partitions=2",
            )
            _wait_for_port(node_port, node)
        yield env, logs
    finally:
        for process in reversed(processes):
            _stop(process)
        assert all(process.poll() is not None for process in processes)


def _logs(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(logs.glob("*.log")))


def test_flower_two_rounds_match_simulation(loopback, tmp_path):
    from anomalib_feddymem.data import generate_synthetic_dataset
    from anomalib_feddymem.federation.checkpoint import Checkpointer
    from anomalib_feddymem.federation.config import from_run_config
    from anomalib_feddymem.federation.simulation import simulate

    env, logs = loopback
    data = tmp_path / "data"
    generate_synthetic_dataset(
        data, PRODUCTS, image_size=64, train_per_product=6, test_good_per_product=2, test_defect_per_type=2
    )
    output = tmp_path / "flower_out"
    run_config = {
        "num-server-rounds": 2,
        "num-clients": 2,
        "min-clients": 2,
        "partition": "category",
        "seed": 0,
        "local-epochs": 1,
        "image-size": 64,
        "batch-size": 4,
        "data-root": str(data),
        "datasets": ",".join(PRODUCTS),
        "model": MODEL,
        "output": str(output),
        "round-timeout": 600,
    }
    overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in run_config.items())
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream", "--run-config", overrides],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}\n{_logs(logs)}"
    checkpoint = Checkpointer(output)
    assert checkpoint.exists(), f"{run.stdout[-4000:]}\n{_logs(logs)}"
    flower_state, _ = checkpoint.load()
    assert flower_state.round == 2
    assert [(r["round"], r["client"], r["status"]) for r in flower_state.rows] == [
        (1, 0, "ok"),
        (1, 1, "ok"),
        (2, 0, "ok"),
        (2, 1, "ok"),
    ]
    assert (output / "metrics.csv").is_file()

    config = from_run_config({**run_config, "output": str(tmp_path / "sim_out")}).replace(progress=False)
    simulated = simulate(config)
    torch.testing.assert_close(flower_state.global_memory, simulated.global_memory, atol=1e-4, rtol=1e-4)
    for flower_row, sim_row in zip(flower_state.rows, simulated.rows, strict=True):
        assert flower_row["upload_bytes"] == sim_row["upload_bytes"]
        assert flower_row["download_bytes"] == sim_row["download_bytes"]
