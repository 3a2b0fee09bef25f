"""Flower loopback: a real SuperLink and two SuperNodes on 127.0.0.1, two rounds via ``flwr run``.

The resulting global memory must match the in-process simulation with the same seed: both run
the same client and server steps on the same records. Everything started is stopped in the
fixture's teardown.
"""

from __future__ import annotations

import pytest
import torch

from flower_processes import FlowerProcesses, synthetic_products, tiny_run_config

pytestmark = pytest.mark.slow

PRODUCTS = ["stripes", "disc"]


@pytest.fixture
def loopback(tmp_path):
    """SuperLink + 2 SuperNodes (partitions 0 and 1) on free loopback ports, all stopped afterwards."""
    flower = FlowerProcesses(tmp_path)
    try:
        flower.superlink()
        for partition in range(2):
            flower.supernode(f"supernode_{partition}", f"partition-id={partition} num-partitions=2")
        yield flower
    finally:
        flower.stop_all()


def test_flower_two_rounds_match_simulation(loopback, tmp_path):
    from anomalib_feddymem.federation.checkpoint import Checkpointer
    from anomalib_feddymem.federation.config import from_run_config
    from anomalib_feddymem.federation.simulation import simulate

    data = synthetic_products(tmp_path / "data", PRODUCTS, train_per_product=6)
    output = tmp_path / "flower_out"
    run_config = tiny_run_config(data, output, PRODUCTS)
    run = loopback.run_app(run_config)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}\n{loopback.log_tail()}"
    checkpoint = Checkpointer(output)
    assert checkpoint.exists(), f"{run.stdout[-4000:]}\n{loopback.log_tail()}"
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
