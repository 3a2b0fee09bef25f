"""Real Flower processes on 127.0.0.1 for the loopback tests: start, wait, run, always stop.

Every service binds a free loopback port; :class:`FlowerProcesses` stops everything it started
(each in its own process group, so the apps Flower spawns go too), also when a test fails.
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

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: FedDyMem options small enough for several real Flower runs in one test session.
TINY_MODEL = (
    "{memory_ratio: 1.0, memory_size: 64, global_memory_size: 96, reduce_ratio: 2, embedding_dim: 32, "
    "upload_precision: float32}"
)


def synthetic_products(root: Path, products: list[str], train_per_product: int = 4) -> Path:
    """Small generated MVTec-layout folders of ``products`` under ``root`` (64 px)."""
    from anomalib_feddymem.data import generate_synthetic_dataset

    generate_synthetic_dataset(
        root, products, image_size=64, train_per_product=train_per_product, test_good_per_product=2,
        test_defect_per_type=2,
    )  # fmt: skip
    return root


def tiny_run_config(data: Path, output: Path, products: list[str], **changes: object) -> dict[str, object]:
    """A run config over ``products`` of ``data``: one client per product, 2 rounds, all clients needed."""
    return {
        "num-server-rounds": 2,
        "num-clients": len(products),
        "min-clients": len(products),
        "partition": "category",
        "seed": 0,
        "image-size": 64,
        "batch-size": 4,
        "data-root": str(data),
        "datasets": ",".join(products),
        "model": TINY_MODEL,
        "output": str(output),
        "round-timeout": 600,
        **changes,
    }


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until ``process`` listens on ``port``; fail early, naming it, if it exits first."""
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


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop one started process and its process group (the apps it spawned)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def run_config_overrides(run_config: dict) -> str:
    """``--run-config`` text of a mapping (TOML values: quoted strings, lower-case booleans)."""
    return " ".join(f"{key}={_toml(value)}" for key, value in run_config.items())


class FlowerProcesses:
    """SuperLink, SuperNodes and ``flwr`` calls of one test, logged under ``root / "logs"``.

    ``FLWR_HOME`` is private to the test and names one connection, ``loopback``, to the SuperLink.
    """

    def __init__(self, root: Path) -> None:
        if shutil.which("flower-superlink", path=str(BIN)) is None:
            pytest.skip("flower-superlink is not installed next to this Python")
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = root / "flwr_home"
        self.flwr_home.mkdir(exist_ok=True)
        self.link_port = free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            "MALLOC_MMAP_THRESHOLD_": "131072",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns its own executables
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.connection()

    def connection(self, *, root_certificates: Path | None = None) -> None:
        """Write the ``loopback`` connection: insecure, or TLS with ``root_certificates``."""
        security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
        (self.flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.link_port}"\n{security}\n'
        )

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start ``args`` (an executable next to this Python) in its own session, logged to ``name.log``."""
        log = (self.logs / f"{name}.log").open("a")
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def superlink(self, *extra: str, insecure: bool = True) -> subprocess.Popen:
        """A SuperLink on the test's port (``extra``: e.g. ``--simulation`` or TLS options).

        It runs the apps in this environment: by default a SuperLink builds one per run with
        ``uv sync``, which resolves torch and the rest from the index instead of the pinned versions.
        """
        args = ["flower-superlink", *(["--insecure"] if insecure else []), "--host", "127.0.0.1"]
        args.append("--disable-runtime-dependency-installation")
        link = self.start("superlink", *args, "--port", str(self.link_port), *extra)
        wait_for_port(self.link_port, link)
        return link

    def supernode(self, name: str, node_config: str, *extra: str, insecure: bool = True) -> subprocess.Popen:
        """A SuperNode connected to the test's SuperLink, listening on a free port of its own."""
        port = free_port()
        node = self.start(
            name,
            "flower-supernode",
            *(["--insecure"] if insecure else []),
            "--superlink",
            f"127.0.0.1:{self.link_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-config",
            node_config,
            *extra,
        )
        wait_for_port(port, node)
        return node

    def flwr(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """``flwr ARGS`` against the ``loopback`` connection, from the test's folder."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run_app(self, run_config: dict, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """``flwr run`` this repository's app with ``run_config``, streaming its logs."""
        overrides = run_config_overrides(run_config)
        return self.flwr("run", str(REPO), "loopback", "--stream", "--run-config", overrides, *extra, timeout=timeout)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of every log, for assertion messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in sorted(self.logs.glob("*.log")))

    def stop_all(self) -> None:
        """Stop everything started, newest first, and check that it is gone."""
        for process in reversed(list(self.processes.values())):
            stop(process)
        assert all(process.poll() is not None for process in self.processes.values())
