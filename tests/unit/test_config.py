"""Federation configs: YAML files, CLI flags over them, the shipped configs from any directory."""

from __future__ import annotations

import numpy as np
import pytest
from anomalib_feddymem.federation.config import FederationConfig, load_config

DIM = 8


def _upload(k: int = 4, dim: int = DIM, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, dim)).astype(np.float32), rng.uniform(1, 5, size=k).astype(np.float32)


# --------------------------------------------------------------------------------------- config
def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "fed.yaml"
    path.write_text("clients: 4\npartition: iid\nmodel: {memory_size: 32}\n")
    config = load_config(path, clients=2, datasets="stripes,disc", model={"embedding_dim": 16})
    assert (config.clients, config.partition, config.datasets) == (2, "iid", ["stripes", "disc"])
    assert config.model == {"memory_size": 32, "embedding_dim": 16}
    path.write_text("clients: 4\nrounds_typo: 3\n")
    with pytest.raises(ValueError, match=r"fed.yaml: unknown option\(s\) \['rounds_typo'\]"):
        load_config(path)
    with pytest.raises(ValueError, match="partition must be one of"):
        FederationConfig(partition="random")
    with pytest.raises(ValueError, match="min_clients \\(3\\) cannot exceed clients \\(2\\)"):
        FederationConfig(clients=2, min_clients=3)


def test_cli_flags_override_config(tmp_path):
    from anomalib_feddymem.cli import _config_from_args, build_parser

    path = tmp_path / "base.yaml"
    path.write_text("clients: 3\nrounds: 2\nmin_clients: 2\nmodel: {reduce_ratio: 4}\n")
    args = build_parser().parse_args([
        "simulate",
        "--config",
        str(path),
        "--data-root",
        str(tmp_path),
        "--datasets",
        "x,y",
        "--clients",
        "2",
        "--partition",
        "quantity",
        "--alpha",
        "2",
        "--rounds",
        "5",
        "--local-epochs",
        "2",
        "--seed",
        "9",
        "--output",
        str(tmp_path / "out"),
        "--model",
        "memory_size=99",
        "--resume",
    ])
    config = _config_from_args(args)
    assert (config.data_root, config.datasets, config.clients, config.partition) == (
        str(tmp_path),
        ["x", "y"],
        2,
        "quantity",
    )
    assert (config.alpha, config.rounds, config.local_epochs, config.seed) == (2.0, 5, 2, 9)
    assert config.model["memory_size"] == 99  # flag + file
    assert config.model["reduce_ratio"] == 4  # flag + file
    assert config.min_clients == 2  # from the file, no flag
    assert args.resume


def test_shipped_configs_load_from_any_directory(tmp_path, monkeypatch):
    from anomalib_feddymem.federation.config import resolve_config_path, shipped_configs

    paths = sorted((shipped_configs() / "federated").glob("*.yaml"))
    assert [p.name for p in paths] == ["demo.yaml", "demo_real.yaml", "shared_data.yaml", "synthetic.yaml"]
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the names resolve to the shipped files
    for path in paths:
        for name in (f"configs/federated/{path.name}", f"federated/{path.name}"):
            assert resolve_config_path(name) == path
            assert load_config(name).rounds >= 1, name
    with pytest.raises(FileNotFoundError, match=r"neither a file nor a shipped config; shipped: .*federated/demo.yaml"):
        load_config("configs/federated/nope.yaml")
