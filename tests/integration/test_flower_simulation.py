"""Flower's Simulation Runtime: the same ServerApp and ClientApp on 3 virtual SuperNodes (Ray).

``flwr run`` submits the app to a SuperLink started with ``--simulation`` on a free loopback
port; the run's global memory must equal ``feddymem simulate``'s for the same seed. The SuperLink
runs the apps in this environment (``--disable-runtime-dependency-installation``, see
``flower_processes.FlowerProcesses.superlink``).
"""

from __future__ import annotations

import pytest
import torch

from flower_processes import FlowerProcesses, synthetic_products, tiny_run_config

pytestmark = pytest.mark.slow

PRODUCTS = ["stripes", "disc", "checker"]


def test_simulation_runtime_matches_feddymem_simulate(tmp_path):
    pytest.importorskip("ray", reason="Flower's Simulation Runtime needs flwr[simulation] (Ray)")
    from anomalib_feddymem.federation.checkpoint import Checkpointer
    from anomalib_feddymem.federation.config import from_run_config
    from anomalib_feddymem.federation.simulation import simulate

    output = tmp_path / "flower_out"
    run_config = tiny_run_config(synthetic_products(tmp_path / "data", PRODUCTS), output, PRODUCTS)
    flower = FlowerProcesses(tmp_path)
    try:
        flower.superlink("--simulation")
        run = flower.run_app(run_config, "--federation-config", "num-supernodes=3")
        logs = f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}\n{flower.log_tail()}"
        assert run.returncode == 0, logs
        assert "3 simulated SuperNodes" in run.stdout, logs
    finally:
        flower.stop_all()
    checkpoint = Checkpointer(output)
    assert checkpoint.exists(), logs
    state, _ = checkpoint.load()
    assert state.round == 2
    assert [(r["round"], r["client"], r["status"]) for r in state.rows] == [
        (round_, client, "ok") for round_ in (1, 2) for client in range(3)
    ]

    config = from_run_config({**run_config, "output": str(tmp_path / "sim_out")}).replace(progress=False)
    simulated = simulate(config)
    torch.testing.assert_close(state.global_memory, simulated.global_memory, atol=1e-4, rtol=1e-4)
