"""In-process federation runs end to end.

Two synthetic products at 64 px, six training images each, small memories and one local epoch: a
2-client, 2-round simulation, resume equality, client faults and a rejected upload.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from anomalib_feddymem.federation.checkpoint import Checkpointer, CheckpointError
from anomalib_feddymem.federation.config import FederationConfig
from anomalib_feddymem.federation.server import FederationError

if TYPE_CHECKING:
    from collections.abc import Callable

DIM = 8


def _upload(k: int = 4, dim: int = DIM, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, dim)).astype(np.float32), rng.uniform(1, 5, size=k).astype(np.float32)


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
    with pytest.raises(CheckpointError, match="already holds a run's checkpoint"):
        simulate(_config(tmp_path))
    with pytest.raises(CheckpointError, match="other settings"):
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


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "smaller_by"), [("int8", 2), ("int4", 3)])
def test_server_rejects_an_upload_in_the_wrong_dtype_and_the_round_goes_on(tmp_path, caplog, precision, smaller_by):
    from anomalib_feddymem.federation.build import build_clients
    from anomalib_feddymem.federation.runner import run_federation
    from anomalib_feddymem.federation.transport import InProcessTransport

    config = _config(tmp_path, rounds=1, model={**MODEL, "upload_precision": precision})
    clients = build_clients(config)
    clients[1].model.upload_precision = "float32"  # a misconfigured (or hostile) site
    with caplog.at_level(logging.WARNING):
        result = run_federation(InProcessTransport(clients, image_size=64), config)
    rows = _rows(tmp_path)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == f"rejected: items must be {precision} on the wire, got float32"
    assert f"Rejected the upload of client 1: items must be {precision} on the wire" in caplog.text
    # int8 items are a quarter of float32 ones, int4 an eighth; weights, the affine code and
    # headers are fixed costs, and the two clients hold different numbers of images
    assert int(rows[0]["upload_bytes"]) < int(rows[1]["upload_bytes"]) / smaller_by
    assert result.global_memory.shape[1] == 32
