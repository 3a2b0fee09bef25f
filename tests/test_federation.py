"""Server step (validation, weighted k-means, warm start), messages, config, and in-process runs.

The end-to-end runs use two synthetic products at 64 px, six training images each, small memories
and one local epoch: a 2-client, 2-round simulation, resume equality, and client faults.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from anomalib_feddymem.federation.checkpoint import Checkpointer
from anomalib_feddymem.federation.config import FederationConfig, load_config
from anomalib_feddymem.federation.messages import decode_memory, encode_memory, record_nbytes
from anomalib_feddymem.federation.server import FederationError, InvalidUploadError, server_step, validate_upload
from flwr.app import Array

if TYPE_CHECKING:
    from collections.abc import Callable

DIM = 8


def _upload(k: int = 4, dim: int = DIM, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, dim)).astype(np.float32), rng.uniform(1, 5, size=k).astype(np.float32)


# ------------------------------------------------------------------------------ upload validation
def test_valid_upload_passes():
    validate_upload(*_upload(), embedding_dim=DIM, max_items=10)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda i, w: (i.astype(np.float64), w), "dtype must be float32"),
        (lambda i, w: (i, w.astype(np.int64)), "dtype must be float32"),
        (lambda i, w: (i[:, :-1], w), r"items must have shape \(K, 8\)"),
        (lambda i, w: (i[0], w), r"items must have shape \(K, 8\)"),
        (lambda i, w: (i, w[:-1]), r"weights must have shape \(4,\)"),
        (lambda i, w: (np.where(np.eye(4, DIM, dtype=bool), np.nan, i).astype(np.float32), w), "NaN or infinite"),
        (lambda i, _w: (i, np.full(4, np.inf, dtype=np.float32)), "NaN or infinite"),
        (lambda i, w: (i, -w), "non-negative"),
        (lambda _i, _w: (np.zeros((0, DIM), np.float32), np.zeros(0, np.float32)), "empty upload"),
    ],
)
def test_bad_uploads_rejected_with_reason(mutate, reason):
    items, weights = mutate(*_upload())
    with pytest.raises(InvalidUploadError, match=reason):
        validate_upload(items, weights, embedding_dim=DIM, max_items=10)


def test_oversize_upload_rejected():
    with pytest.raises(InvalidUploadError, match="too many items: 11 > max_upload_items=10"):
        validate_upload(*_upload(11), embedding_dim=DIM, max_items=10)


def test_bad_upload_does_not_stop_the_round():
    good, other = _upload(seed=1), _upload(seed=2)
    bad = (good[0].astype(np.float64), good[1])
    nan = (np.full((4, DIM), np.nan, np.float32), good[1])
    result = server_step({0: good, 1: bad, 2: other, 3: nan}, size=3, embedding_dim=DIM, max_items=10, min_clients=2)
    assert result.accepted == [0, 2]
    assert set(result.rejected) == {1, 3}
    assert "float32" in result.rejected[1]
    assert "NaN" in result.rejected[3]
    assert result.global_memory.shape == (3, DIM)


def test_too_few_valid_uploads_is_an_error():
    bad = (np.ones((4, DIM), np.float64), np.ones(4, np.float32))
    with pytest.raises(FederationError, match=r"Only 1 valid upload.*min_clients=2"):
        server_step({0: _upload(), 1: bad}, size=3, embedding_dim=DIM, max_items=10, min_clients=2)


# ------------------------------------------------------------------------ weighted k-means, warm start
def _clusters(seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Two clients whose items lie around the same three centres, with unequal weights."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * DIM, [10.0] * DIM, [-10.0] + [0.0] * (DIM - 1)])
    uploads = {}
    for client in range(2):
        items = np.repeat(centres, 5, axis=0) + rng.normal(scale=0.1, size=(15, DIM))
        uploads[client] = (items.astype(np.float32), rng.integers(1, 10, size=15).astype(np.float32))
    return uploads


@pytest.mark.parametrize("method", ["kcenter", "kmeans"])
def test_aggregation_groups_are_weighted_means_preserving_mass(method):
    uploads = _clusters(0)
    result = server_step(uploads, size=3, embedding_dim=DIM, max_items=100, seed=0, method=method)
    items = np.concatenate([u[0] for u in uploads.values()]).astype(np.float64)
    weights = np.concatenate([u[1] for u in uploads.values()]).astype(np.float64)
    g, w = result.global_memory.double().numpy(), result.weights.double().numpy()
    assert g.shape == (3, DIM)
    np.testing.assert_allclose(w.sum(), weights.sum(), rtol=1e-6)
    np.testing.assert_allclose((g * w[:, None]).sum(0), (items * weights[:, None]).sum(0), rtol=1e-4, atol=1e-3)
    # every centroid is the weighted mean of the items nearest to it
    labels = ((items[:, None] - g[None]) ** 2).sum(-1).argmin(1)
    for k in range(3):
        np.testing.assert_allclose(
            g[k], np.average(items[labels == k], axis=0, weights=weights[labels == k]), atol=1e-4
        )


def test_warm_start_from_previous_global_memory():
    uploads = _clusters(1)
    first = server_step(uploads, size=3, embedding_dim=DIM, max_items=100, seed=0, method="kmeans").global_memory
    # warm-started from G, the result no longer depends on the k-means seed and keeps G's item order
    a = server_step(
        uploads, size=3, embedding_dim=DIM, max_items=100, seed=1, previous=first, method="kmeans"
    ).global_memory
    b = server_step(
        uploads, size=3, embedding_dim=DIM, max_items=100, seed=7, previous=first, method="kmeans"
    ).global_memory
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, first, atol=1e-4, rtol=0)
    permuted = first[[2, 0, 1]]
    c = server_step(
        uploads, size=3, embedding_dim=DIM, max_items=100, seed=0, previous=permuted, method="kmeans"
    ).global_memory
    torch.testing.assert_close(c, permuted, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- messages
def test_memory_record_round_trip_and_bytes():
    items, weights = _upload(16, 32)
    record = encode_memory(torch.from_numpy(items), weights)
    decoded_items, decoded_weights = decode_memory(record)
    np.testing.assert_array_equal(decoded_items, items)
    np.testing.assert_array_equal(decoded_weights, weights)
    # the serialised sizes: the raw buffers plus small npy headers
    assert items.nbytes + weights.nbytes < record_nbytes(record) < items.nbytes + weights.nbytes + 512
    assert record_nbytes(None) == 0
    assert decode_memory(encode_memory(items))[1] is None


@pytest.mark.parametrize(("precision", "tolerance", "bytes_per_value"), [("float16", 0.01, 2), ("int8", None, 1)])
def test_quantised_records_round_trip_within_their_step(precision, tolerance, bytes_per_value):
    rng = np.random.default_rng(0)
    items = (rng.normal(size=(64, 32)) * rng.uniform(0.1, 5, size=32)).astype(np.float32)
    weights = rng.uniform(1, 9, size=64).astype(np.float32)
    record = encode_memory(items, weights, precision)
    decoded, decoded_weights = decode_memory(record, precision)
    assert decoded.dtype == np.float32
    assert decoded.shape == items.shape
    np.testing.assert_array_equal(decoded_weights, weights)
    if tolerance is None:  # int8: half a step of each dimension's range
        step = (items.max(0) - items.min(0)) / 255
        assert (np.abs(decoded - items) <= step / 2 + 1e-6).all()
    else:
        np.testing.assert_allclose(decoded, items, rtol=tolerance, atol=1e-3)
    payload = items.size * bytes_per_value + weights.nbytes + (2 * 32 * 4 if precision == "int8" else 0)
    assert payload < record_nbytes(record) < payload + 768


def test_receiver_refuses_items_of_another_precision_or_a_broken_code():
    items, weights = _upload(8, 4)
    with pytest.raises(ValueError, match="items must be int8 on the wire, got float32"):
        decode_memory(encode_memory(items, weights, "float32"), "int8")
    with pytest.raises(ValueError, match="items must be float32 on the wire, got float16"):
        decode_memory(encode_memory(items, weights, "float16"), "float32")
    record = encode_memory(items, weights, "int8")
    record["items-scale"] = Array(-np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="items-scale must be positive"):
        decode_memory(record, "int8")
    record["items-scale"] = Array(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"items-scale must be float32 of shape \(4,\)"):
        decode_memory(record, "int8")
    del record["items-offset"]
    with pytest.raises(ValueError, match="int8 items need"):
        decode_memory(record, "int8")
    with pytest.raises(ValueError, match="wire precision must be one of"):
        encode_memory(items, weights, "int4")


@pytest.mark.slow
def test_server_rejects_an_upload_in_the_wrong_dtype_and_the_round_goes_on(tmp_path, caplog):
    from anomalib_feddymem.federation.build import build_clients
    from anomalib_feddymem.federation.runner import run_federation
    from anomalib_feddymem.federation.transport import InProcessTransport

    config = _config(tmp_path, rounds=1, model={**MODEL, "upload_precision": "int8"})
    clients = build_clients(config)
    clients[1].model.upload_precision = "float32"  # a misconfigured (or hostile) site
    with caplog.at_level(logging.WARNING):
        result = run_federation(InProcessTransport(clients, image_size=64), config)
    rows = _rows(tmp_path)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "rejected: items must be int8 on the wire, got float32"
    assert "Rejected the upload of client 1: items must be int8 on the wire" in caplog.text
    # int8 items are a quarter of float32 ones; weights, the affine code and headers are fixed costs
    assert int(rows[0]["upload_bytes"]) < int(rows[1]["upload_bytes"]) / 2
    assert result.global_memory.shape[1] == 32


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


# ------------------------------------------------------------------------------ in-process runs
SYNTHETIC = {"train_per_product": 6, "test_good_per_product": 2, "test_defect_per_type": 2}
# Fixed sizes and float32 items, so byte counts below are exact; the defaults are tested apart.
MODEL = {
    "memory_ratio": 1.0,
    "memory_size": 64,
    "global_memory_size": 48,
    "reduce_ratio": 2,
    "embedding_dim": 32,
    "upload_precision": "float32",
}


def _config(output: Path, **changes) -> FederationConfig:
    base = FederationConfig(
        datasets=["stripes", "disc"],
        clients=2,
        partition="category",
        rounds=2,
        local_epochs=1,
        seed=0,
        output=str(output),
        image_size=64,
        batch_size=4,
        progress=False,
        synthetic=SYNTHETIC,
        model=MODEL,
    )
    return base.replace(**changes)


def _rows(output: Path) -> list[dict[str, str]]:
    with (output / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 2-client, 2-round simulation, exported to OpenVINO at the end."""
    from anomalib_feddymem.federation.simulation import simulate

    output = tmp_path_factory.mktemp("reference")
    return simulate(_config(output, export_openvino=True))


@pytest.mark.slow
def test_two_client_two_round_simulation(reference_run):
    output = reference_run.output
    rows = _rows(output)
    assert list(rows[0])[:6] == ["round", "client", "image_auroc", "pixel_auroc", "upload_bytes", "download_bytes"]
    assert [(r["round"], r["client"], r["status"]) for r in rows] == [
        ("1", "0", "ok"),
        ("1", "1", "ok"),
        ("2", "0", "ok"),
        ("2", "1", "ok"),
    ]
    g_bytes = 48 * 32 * 4  # G: 48 items of dimension 32, float32
    upload = 32 * 32 * 4 + 32 * 4  # memory-reduce 2x: 32 items + 32 weights
    for row in rows:
        assert 0.5 <= float(row["image_auroc"]) <= 1.0
        assert 0.5 <= float(row["pixel_auroc"]) <= 1.0
        assert upload < int(row["upload_bytes"]) < upload + 512
        # G_r is downloaded once per round (for evaluation); clients keep it for the next round's training
        assert g_bytes < int(row["download_bytes"]) < g_bytes + 256
        assert row["train_images"] == "6"
        assert row["test_images"] == "6"
        assert row["global_memory_items"] == "48"
    assert reference_run.global_memory.shape == (48, 32)
    assert (output / "metrics.png").stat().st_size > 1000
    assert (output / "partition.csv").is_file()
    assert Checkpointer(output).latest_file.read_text() == "round_002"


@pytest.mark.slow
def test_clients_export_to_openvino(reference_run, tmp_path):
    import openvino as ov
    from anomalib_feddymem.federation.build import build_clients
    from PIL import Image

    assert set(reference_run.exports) == {0, 1}
    xml = Path(reference_run.exports[0])
    assert xml.suffix == ".xml"
    assert xml.with_suffix(".bin").is_file()
    # the exported client 0 scores like the client's torch model restored from the last checkpoint
    state_folder = reference_run.output / "checkpoints" / "round_002"
    config = _config(tmp_path)
    client = build_clients(config)[0]
    client.load_state_dict(Checkpointer.load_client(state_folder, 0))
    image_path = client.datamodule.test_data.samples.image_path.iloc[0]
    image = np.asarray(Image.open(image_path).convert("RGB").resize((64, 64)), dtype=np.float32) / 255
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = client.model.eval()(batch).pred_score.item()
    compiled = ov.Core().compile_model(str(xml), "CPU")  # OpenVINO's defaults
    outputs = compiled(batch.numpy())
    score = float(np.asarray(outputs[compiled.output("pred_score")]).ravel()[0])
    assert score == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(reference_run, tmp_path):
    from anomalib_feddymem.federation.simulation import simulate

    first = simulate(_config(tmp_path, rounds=1))
    assert first.rows[-1]["round"] == 1
    resumed = simulate(_config(tmp_path, rounds=2), resume=True)
    assert torch.equal(resumed.global_memory, reference_run.global_memory)
    assert [r["round"] for r in _rows(tmp_path)] == ["1", "1", "2", "2"]
    with pytest.raises(Exception, match="already holds a run's checkpoint"):
        simulate(_config(tmp_path))
    with pytest.raises(Exception, match="other settings"):
        simulate(_config(tmp_path, seed=1, rounds=3), resume=True)


def _failing_in_round(round_to_fail: int, client_id: int) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Patch a client's ``fit`` to raise in one round."""
    from anomalib_feddymem.federation.client import FedDyMemClient

    original = FedDyMemClient.fit

    def fit(self, round_number) -> tuple[np.ndarray, np.ndarray]:
        if self.client_id == client_id and round_number == round_to_fail:
            msg = "simulated crash"
            raise RuntimeError(msg)
        return original(self, round_number)

    return fit


@pytest.mark.slow
def test_failed_client_is_logged_and_round_completes(tmp_path, monkeypatch, caplog):
    from anomalib_feddymem.federation.client import FedDyMemClient
    from anomalib_feddymem.federation.simulation import simulate

    monkeypatch.setattr(FedDyMemClient, "fit", _failing_in_round(2, client_id=1))
    with caplog.at_level(logging.WARNING):
        result = simulate(_config(tmp_path, min_clients=1))
    rows = _rows(tmp_path)
    assert rows[3]["round"] == "2"
    assert rows[3]["client"] == "1"
    assert rows[3]["status"] == "failed: RuntimeError: simulated crash"
    assert rows[3]["upload_bytes"] == "0"
    assert rows[3]["image_auroc"]  # it still received G_2 and evaluated
    assert "Round 2: 1 client(s) failed: client 1: RuntimeError: simulated crash" in caplog.text
    assert result.global_memory.shape[1] == 32


@pytest.mark.slow
def test_too_few_clients_stops_with_checkpoint_intact_then_resumes(reference_run, tmp_path, monkeypatch):
    from anomalib_feddymem.federation.client import FedDyMemClient
    from anomalib_feddymem.federation.simulation import simulate

    with monkeypatch.context() as patch:
        patch.setattr(FedDyMemClient, "fit", _failing_in_round(2, client_id=0))
        with pytest.raises(
            FederationError,
            match=r"Round 2: only 1 of 2 clients replied \(min_clients=2\).*"
            r"client 0: RuntimeError: simulated crash.*round 1.*intact",
        ):
            simulate(_config(tmp_path, min_clients=2))
    assert Checkpointer(tmp_path).latest_file.read_text() == "round_001"
    assert [r["round"] for r in _rows(tmp_path)] == ["1", "1"]
    resumed = simulate(_config(tmp_path, min_clients=2), resume=True)
    assert torch.equal(resumed.global_memory, reference_run.global_memory)


@pytest.mark.slow
def test_client_with_masked_and_unmasked_products_gets_pixel_auroc(tmp_path):
    """A client holding a product with masks and one without is still scored per pixel.

    The product without masks is like headct; the client is scored per pixel on the masked one, and
    its image AUROC pools both products.
    """
    import shutil

    from anomalib_feddymem.data import generate_synthetic_dataset
    from anomalib_feddymem.federation.simulation import simulate

    root = tmp_path / "data"
    generate_synthetic_dataset(root, ["stripes", "disc"], image_size=64, **SYNTHETIC)
    shutil.rmtree(root / "disc" / "ground_truth")
    config = _config(tmp_path / "out", data_root=str(root), clients=1, partition="iid", rounds=1)
    simulate(config)
    (row,) = _rows(tmp_path / "out")
    assert row["test_images"] == "12"
    assert 0.5 <= float(row["image_auroc"]) <= 1.0
    assert row["pixel_auroc"]
    assert 0.5 <= float(row["pixel_auroc"]) <= 1.0
