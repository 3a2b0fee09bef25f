"""Bad input fails early with an error naming the file, folder, option or shape at fault."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from anomalib_feddymem.data import DatasetFolderError, folder_datamodule, validate_dataset_folder

if TYPE_CHECKING:
    from collections.abc import Callable


@pytest.fixture
def dataset_copy(synthetic_folder: Path, tmp_path: Path) -> Path:
    """A writable copy of the synthetic ``stripes`` folder that a test may damage."""
    return Path(shutil.copytree(synthetic_folder, tmp_path / "stripes"))


# ----------------------------------------------------------------------------- dataset folders
def test_valid_folder_is_described(dataset_copy: Path) -> None:
    info = validate_dataset_folder(dataset_copy)
    assert len(info.train_images) == 8
    assert len(info.test_good) == 3
    assert sorted(info.defects) == ["blob", "scratch"]
    assert info.has_masks


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: path.write_bytes(b"this is not a PNG"), id="garbage"),
        pytest.param(lambda path: path.write_bytes(path.read_bytes()[:200]), id="truncated"),
        pytest.param(lambda path: path.write_bytes(b""), id="empty-file"),
    ],
)
def test_corrupt_training_image_is_named(dataset_copy: Path, damage: Callable[[Path], Any]) -> None:
    corrupt = dataset_copy / "train" / "good" / "003.png"
    damage(corrupt)
    with pytest.raises(DatasetFolderError, match=f"Corrupt or unreadable image: {corrupt}"):
        validate_dataset_folder(dataset_copy)
    with pytest.raises(DatasetFolderError, match=str(corrupt)):
        folder_datamodule(dataset_copy)


def test_corrupt_test_image_is_named(dataset_copy: Path) -> None:
    corrupt = dataset_copy / "test" / "blob" / "001.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetFolderError, match=str(corrupt)):
        validate_dataset_folder(dataset_copy)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DatasetFolderError, match=f"Dataset folder not found: {missing}"):
        folder_datamodule(missing)


def test_folder_without_training_images_is_named(dataset_copy: Path) -> None:
    train = dataset_copy / "train" / "good"
    for image in train.iterdir():
        image.unlink()
    (train / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetFolderError, match=f"No training images in {train}"):
        validate_dataset_folder(dataset_copy)


def test_folder_without_test_images_is_named(dataset_copy: Path) -> None:
    shutil.rmtree(dataset_copy / "test")
    with pytest.raises(DatasetFolderError, match=f"No test folder: {dataset_copy / 'test'}"):
        validate_dataset_folder(dataset_copy)


def test_folder_without_anomalous_images_is_named(dataset_copy: Path) -> None:
    for defect in ("blob", "scratch"):
        shutil.rmtree(dataset_copy / "test" / defect)
    with pytest.raises(DatasetFolderError, match="No anomalous test images"):
        validate_dataset_folder(dataset_copy)


def test_missing_mask_is_named(dataset_copy: Path) -> None:
    mask = dataset_copy / "ground_truth" / "scratch" / "001_mask.png"
    mask.unlink()
    with pytest.raises(DatasetFolderError, match=f"Missing mask {mask}"):
        validate_dataset_folder(dataset_copy)


def test_cli_reports_a_bad_dataset_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user error (here an empty product folder) exits 2 with one line naming the folder, no traceback."""
    from anomalib_feddymem.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["simulate", "--data-root", str(tmp_path), "--datasets", "empty", "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("feddymem simulate: error: ")
    assert str(tmp_path / "empty") in error
    assert "Traceback" not in error


# --------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("memory_size", 0),
        ("global_memory_size", 0),
        ("reduce_ratio", 0.5),
        ("local_epochs", 0),
        ("learning_rate", 0.0),
        ("memory_init", "random"),
    ],
)
def test_impossible_option_fails_before_anything_is_built(
    option: str, value: float, tiny_model_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib_feddymem.models.feddymem import lightning_model

    def must_not_build(*_args: Any, **_kwargs: Any) -> None:  # noqa: ANN401
        pytest.fail("the network was built before the options were checked")

    monkeypatch.setattr(lightning_model, "FedDyMemModel", must_not_build)
    with pytest.raises(ValueError, match=rf"^{option} must be"):
        lightning_model.FedDyMem(**{**tiny_model_options, option: value})


@pytest.mark.parametrize(("option", "value"), [("embedding_dim", 0), ("num_neighbors", 0)])
def test_impossible_network_option_is_named(option: str, value: int) -> None:
    from anomalib_feddymem import FedDyMemModel

    with pytest.raises(ValueError, match=rf"^{option} must be >= 1"):
        FedDyMemModel(pre_trained=False, **{option: value})


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_score_fraction_outside_unit_interval_is_named(value: float) -> None:
    from anomalib_feddymem import FedDyMemModel

    with pytest.raises(ValueError, match=r"^score_fraction must be in \[0, 1\]"):
        FedDyMemModel(pre_trained=False, score_fraction=value)


@pytest.mark.slow
def test_cli_rejects_impossible_option(synthetic_folder: Path, tmp_path: Path, cli: Callable[..., Any]) -> None:
    """Through ``anomalib train`` the same error reaches the user, before any training."""
    result = cli(
        [
            "anomalib",
            "train",
            "--model",
            "FedDyMem",
            "--model.memory_size",
            "0",
            "--data",
            "anomalib.data.Folder",
            "--data.name",
            "stripes",
            "--data.root",
            synthetic_folder,
            "--data.normal_dir",
            "train/good",
            "--data.abnormal_dir",
            "[test/blob]",
            "--data.num_workers",
            "0",
            "--default_root_dir",
            tmp_path / "results",
        ],
        cwd=tmp_path,
        timeout=300,
        expect_success=False,
    )
    assert result.returncode != 0
    assert "memory_size must be >= 1, got 0" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("*.ckpt")), "nothing may be trained"


# ---------------------------------------------------------------------------------- global memory
@pytest.mark.parametrize(
    ("memory", "shape"),
    [
        (torch.zeros(10, 31), "(10, 31)"),
        (torch.zeros(32), "(32,)"),
        (torch.zeros(0, 32), "(0, 32)"),
        (torch.zeros(2, 10, 32), "(2, 10, 32)"),
    ],
)
def test_wrong_global_memory_shape_is_named(
    memory: torch.Tensor, shape: str, make_tiny_model: Callable[..., Any]
) -> None:
    model = make_tiny_model()
    with pytest.raises(ValueError, match=rf"memory must have shape \(K>0, 32\), got {re.escape(shape)}"):
        model.set_global_memory(memory)
    assert not bool(model.has_global_memory), "a rejected memory must not switch the client to G"
    assert model.model.memory.numel() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_global_memory_is_rejected(bad: float, make_tiny_model: Callable[..., Any]) -> None:
    model = make_tiny_model()
    memory = torch.randn(8, 32)
    memory[3, 5] = bad
    with pytest.raises(ValueError, match=r"memory of shape \(8, 32\) contains NaN or infinite values"):
        model.set_global_memory(memory)
    assert not bool(model.has_global_memory)


# ------------------------------------------------------------------------------ real data (control)
@pytest.mark.real_data
@pytest.mark.parametrize(
    ("name", "train", "defects", "masks"),
    [
        ("mvtec_bottle", 209, {"broken_large", "broken_small", "contamination"}, True),
        ("magnetic_tile", 762, {"blowhole", "break", "crack", "fray", "uneven"}, True),
        ("mpdd_metal_plate", 54, {"defect"}, True),
        ("headct", 80, {"hemorrhage"}, False),
    ],
)
def test_real_benchmark_folders_pass_validation(
    real_data_root: Path, name: str, train: int, defects: set[str], masks: bool
) -> None:
    """The validator accepts the real layouts (headct: no ground_truth, image-level labels only)."""
    folder = real_data_root / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    info = validate_dataset_folder(folder, check_images=False)
    assert len(info.train_images) == train
    assert set(info.defects) == defects
    assert info.has_masks is masks
