"""OpenVINO export through ``Engine.export``: same outputs as torch, any batch size and resolution.

The exported graph is the Lightning module's ``forward``: anomalib pre-processing, the
FedDyMem network and anomalib's post-processing (normalised scores and maps). It is compared
with that same ``forward`` in eval mode on the same images.

Every comparison compiles the IR with **no config**, as ``OpenVINOInferencer`` and ``anomalib
predict`` do: on a bfloat16-capable CPU, OpenVINO's default, the IR's "precise" marks
(:func:`~anomalib_feddymem.models.components.export.keep_float32`) must keep it at torch's answers.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405 - parses our own exporter's output
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import to_dtype, to_image

#: The tiny model of conftest trains and infers at this size.
TINY_SIZE = 64
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
    assert path is not None
    assert Path(path).suffix == ".xml"
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


def test_exported_ir_keeps_float32_at_openvino_defaults(exported: Path) -> None:
    """Every computing layer is marked precise, and none is of a version the CPU plugin replaces."""
    import openvino as ov

    model = ov.Core().read_model(exported)
    versions = {(op.get_type_name(), op.get_type_info().version_id) for op in model.get_ordered_ops()}
    assert ("Interpolate", "opset11") not in versions
    assert ("Pad", "opset12") not in versions
    assert ("Interpolate", "opset4") in versions  # the pre-processor's resize and the map upsampling
    # The exported graph reranks the matmul's best candidates exactly; eager torch needs no top-k.
    assert any(kind == "TopK" for kind, _ in versions), sorted(versions)
    root = ET.parse(exported).getroot()  # noqa: S314 - our own export
    layers = [layer for layer in root.iter("layer") if layer.get("type") not in {"Parameter", "Result", "Const"}]
    unmarked = [layer.get("name") for layer in layers if layer.find("rt_info/attribute[@name='precise']") is None]
    assert layers
    assert not unmarked, unmarked
    compiled = ov.Core().compile_model(exported, "CPU")
    bf16 = {
        op.get_rt_info()["layerType"].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["runtimePrecision"].astype(str) == "bf16"
    }
    # Only the ranking matmul (and its fused expansion) may run in bfloat16; the scores are recomputed.
    assert bf16 <= {"FullyConnected", "Eltwise", "Reorder"}, bf16


@pytest.mark.slow
def test_export_log_has_no_traceback(
    trained_tiny: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The export converts no opset (it exports at 18), so ONNX's version converter prints nothing."""
    from anomalib.deploy import ExportType

    trained_tiny["engine"].export(trained_tiny["model"], export_type=ExportType.OPENVINO, export_root=tmp_path)
    output = "".join(capfd.readouterr())
    assert "Traceback" not in output, output[-3000:]
    assert "No Adapter" not in output, output[-3000:]
    onnx_model = onnx.load(next(tmp_path.rglob("*.onnx"))) if list(tmp_path.rglob("*.onnx")) else None
    if onnx_model is not None:
        assert {opset.version for opset in onnx_model.opset_import if opset.domain in {"", "ai.onnx"}} == {18}


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
    inferencer = OpenVINOInferencer(path=exported, device="CPU")  # no config: OpenVINO's defaults
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

    compiled = ov.Core().compile_model(exported, "CPU")
    larger = torch.nn.functional.interpolate(test_images, size=(96, 96), mode="bilinear", align_corners=False)
    outputs = {output.get_any_name(): value for output, value in compiled(larger.numpy()).items()}
    reference = torch_reference(trained_tiny["model"], larger)
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), reference.pred_score.numpy(), atol=SCORE_TOLERANCE)
    assert outputs["anomaly_map"].shape == (3, 1, 64, 64)
    np.testing.assert_allclose(outputs["anomaly_map"], reference.anomaly_map.numpy(), atol=MAP_TOLERANCE)


def test_openvino_prediction_goes_through_anomalib_visualiser(
    exported: Path, synthetic_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As anomalib's docs show: ``OpenVINOInferencer.predict(path)``, then ``visualize_image_item``."""
    from anomalib.deploy import OpenVINOInferencer
    from anomalib.visualization import visualize_image_item

    monkeypatch.chdir(tmp_path)
    inferencer = OpenVINOInferencer(path=exported, device="CPU")
    image_path = synthetic_folder / "test" / "blob" / "000.png"
    predictions = inferencer.predict(image_path)
    item = predictions.items[0]
    assert item.anomaly_map is not None
    assert item.pred_label is not None
    picture = visualize_image_item(item, fields=["image", "anomaly_map"], overlay_fields=[("image", ["anomaly_map"])])
    assert picture is not None
    assert picture.size == (3 * 256, 256)  # three 256 px panels
    picture.save(tmp_path / "prediction.png")


@pytest.mark.parametrize("size", [64, 96])
def test_torch_inferencer_loads_the_exported_torch_model(
    size: int, trained_tiny: dict[str, Any], test_images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Engine.export(TORCH)`` then anomalib's ``TorchInferencer``; a 96 px image is resized by the model."""
    from anomalib.deploy import ExportType, TorchInferencer

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's opt-in to unpickle any exported torch model

    path = trained_tiny["engine"].export(trained_tiny["model"], export_type=ExportType.TORCH, export_root=tmp_path)
    inferencer = TorchInferencer(path=path, device="cpu")
    images = torch.nn.functional.interpolate(test_images, size=(size, size), mode="bilinear", align_corners=False)
    predicted = inferencer.predict(images)
    reference = torch_reference(trained_tiny["model"], images)
    torch.testing.assert_close(predicted.pred_score.reshape(-1), reference.pred_score.reshape(-1))
    assert predicted.anomaly_map.shape[-2:] == (TINY_SIZE, TINY_SIZE)


def test_keep_float32_converts_and_marks_a_small_ir(tmp_path: Path) -> None:
    """Interpolate-11 and Pad-12 become v4 and v1 with the same outputs; every layer gets marked."""
    import openvino as ov
    from anomalib_feddymem.models.components.export import keep_float32

    class Small(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            up = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
            return torch.nn.functional.pad(up, (2, 2, 2, 2), mode="reflect").sum(dim=1, keepdim=True)

    example = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    onnx_path = tmp_path / "small.onnx"
    torch.onnx.export(Small(), (example,), onnx_path, dynamo=True, opset_version=18)
    xml = tmp_path / "small.xml"
    ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
    before = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(example.numpy())[0]
    marked = keep_float32(xml)
    model = ov.Core().read_model(xml)
    versions = {(op.get_type_name(), op.get_type_info().version_id) for op in model.get_ordered_ops()}
    assert {("Interpolate", "opset4"), ("Pad", "opset1")} <= versions
    assert ("Interpolate", "opset11") not in versions
    assert ("Pad", "opset12") not in versions
    assert marked == xml.read_text().count('name="precise"') > 0
    assert keep_float32(xml) == 0  # idempotent
    after = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(example.numpy())[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after, Small()(example).numpy(), rtol=1e-5, atol=1e-5)


def test_keep_float32_names_a_missing_or_foreign_file(tmp_path: Path) -> None:
    from anomalib_feddymem.models.components.export import keep_float32

    with pytest.raises(FileNotFoundError, match=r"missing.xml"):
        keep_float32(tmp_path / "missing.xml")
    foreign = tmp_path / "foreign.xml"
    foreign.write_text("<html><body/></html>")
    with pytest.raises(ValueError, match=r"foreign\.xml is not an OpenVINO IR"):
        keep_float32(foreign)


def test_exported_decision_follows_anomalib_post_processor(
    exported: Path, trained_tiny: dict[str, Any], test_images: torch.Tensor, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The IR's label is anomalib's, and the same label as torch's.

    That is the normalised score above 0.5, i.e. the raw score above the adaptive (F1-optimal)
    threshold that validation set.
    """
    from anomalib.deploy import OpenVINOInferencer

    post = trained_tiny["model"].post_processor
    threshold, low, high = float(post.image_threshold), float(post.image_min), float(post.image_max)
    assert np.isfinite([threshold, low, high]).all(), (low, threshold, high)
    assert low < threshold < high, (low, threshold, high)
    monkeypatch.chdir(tmp_path)
    predicted = OpenVINOInferencer(path=exported, device="CPU").predict(test_images)
    reference = torch_reference(trained_tiny["model"], test_images)
    with torch.no_grad():
        raw = trained_tiny["model"].model(trained_tiny["model"].pre_processor.transform(test_images)).pred_score
    # The adaptive threshold is one validation image's own score (validation = test here): at such a
    # tie the normalised score is 0.5 up to rounding, which may differ between torch and OpenVINO,
    # so labels are compared off the tie.
    clear = (raw - threshold).abs().numpy() > 1e-4 * (high - low)
    assert clear.any()
    labels = predicted.pred_label.reshape(-1)
    np.testing.assert_array_equal(labels[clear], reference.pred_label.numpy().reshape(-1)[clear])
    np.testing.assert_array_equal(labels[clear], (raw > threshold).numpy()[clear])
    np.testing.assert_array_equal(labels, predicted.pred_score.reshape(-1) > 0.5)
