"""OpenVINO export through ``Engine.export``: same outputs as torch, any batch size and resolution.

The exported graph is the Lightning module's ``forward``: anomalib pre-processing, the
FedDyMem network and anomalib's post-processing (normalised scores and maps). It is compared
with that same ``forward`` in eval mode on the same images.

OpenVINO's CPU plugin runs in bfloat16 by default on CPUs that support it (avx512_bf16/AMX),
which moves normalised maps by ~0.07; FedDyMem's distances need f32, so inference is compiled
with ``INFERENCE_PRECISION_HINT=f32`` (a deployment must do the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import to_dtype, to_image

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
SCORE_TOLERANCE = 1e-3
MAP_TOLERANCE = 5e-3


def load_images(paths: list[Path]) -> torch.Tensor:
    """Images as anomalib's datasets give them: float RGB in [0, 1], ``(B, 3, H, W)``."""
    return torch.stack([
        to_dtype(to_image(Image.open(path).convert("RGB")), torch.float32, scale=True) for path in paths
    ])


@pytest.fixture(scope="module")
def exported(trained_tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained FedDyMem exported to OpenVINO IR with ``Engine.export``."""
    from anomalib.deploy import ExportType

    root = tmp_path_factory.mktemp("export")
    path = trained_tiny["engine"].export(trained_tiny["model"], export_type=ExportType.OPENVINO, export_root=root)
    assert path is not None and Path(path).suffix == ".xml"
    return Path(path)


@pytest.fixture(scope="module")
def test_images(synthetic_folder: Path) -> torch.Tensor:
    """Three test images of the synthetic folder: a normal one and two defects."""
    paths = [synthetic_folder / "test" / "good" / "000.png", synthetic_folder / "test" / "blob" / "000.png"]
    paths.append(synthetic_folder / "test" / "scratch" / "001.png")
    return load_images(paths)


def torch_reference(model: Any, images: torch.Tensor) -> Any:  # noqa: ANN401
    model.eval()
    with torch.no_grad():
        return model(images)


def test_export_writes_ir_with_dynamic_batch_and_size(exported: Path) -> None:
    import openvino as ov

    assert exported.with_suffix(".bin").is_file()
    model = ov.Core().read_model(exported)
    assert model.input(0).get_partial_shape().to_string() == "[?,3,?,?]"
    names = {output.get_any_name() for output in model.outputs}
    assert {"pred_score", "anomaly_map"} <= names


@pytest.mark.parametrize("batch", [3, 1])
def test_openvino_inferencer_matches_torch(
    batch: int,
    exported: Path,
    trained_tiny: dict[str, Any],
    test_images: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from anomalib.deploy import OpenVINOInferencer

    monkeypatch.chdir(tmp_path)  # the inferencer writes ./openvino_cache
    inferencer = OpenVINOInferencer(path=exported, device="CPU", config=F32)
    images = test_images[:batch]
    predicted = inferencer.predict(images)
    reference = torch_reference(trained_tiny["model"], images)
    np.testing.assert_allclose(
        predicted.pred_score.reshape(-1), reference.pred_score.numpy().reshape(-1), atol=SCORE_TOLERANCE
    )
    assert predicted.anomaly_map.shape[-2:] == reference.anomaly_map.shape[-2:]
    np.testing.assert_allclose(
        predicted.anomaly_map.reshape(reference.anomaly_map.shape), reference.anomaly_map.numpy(), atol=MAP_TOLERANCE
    )


def test_openvino_accepts_other_input_sizes(
    exported: Path, trained_tiny: dict[str, Any], test_images: torch.Tensor
) -> None:
    """A 96 px batch goes through the graph's own resize to 64 px and matches torch."""
    import openvino as ov

    compiled = ov.Core().compile_model(exported, "CPU", F32)
    larger = torch.nn.functional.interpolate(test_images, size=(96, 96), mode="bilinear", align_corners=False)
    outputs = {output.get_any_name(): value for output, value in compiled(larger.numpy()).items()}
    reference = torch_reference(trained_tiny["model"], larger)
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), reference.pred_score.numpy(), atol=SCORE_TOLERANCE)
    assert outputs["anomaly_map"].shape == (3, 1, 64, 64)
    np.testing.assert_allclose(outputs["anomaly_map"], reference.anomaly_map.numpy(), atol=MAP_TOLERANCE)
