"""The scripts of ``examples/`` run as a user runs them, on small generated folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import only_checkpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str | Path, cwd: Path) -> str:
    result = subprocess.run([sys.executable, EXAMPLES / name, *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=900, check=False)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


@pytest.mark.slow
def test_train_and_predict_then_export(synthetic_folder: Path, tmp_path: Path) -> None:
    printed = run_example("train_and_predict.py", synthetic_folder, cwd=tmp_path)
    assert "score" in printed, printed[-2000:]
    assert "anomalous:" in printed, printed[-2000:]
    checkpoint = only_checkpoint(tmp_path / "results" / "train_and_predict")
    image = sorted((synthetic_folder / "test" / "blob").iterdir())[0]
    printed = run_example("export_openvino.py", checkpoint, image, cwd=tmp_path)
    assert f"{image.name}: score" in printed, printed[-2000:]
    assert (tmp_path / "results" / "export_openvino" / f"{image.stem}_prediction.png").stat().st_size > 1000


@pytest.mark.slow
def test_federate_three_folders(synthetic_root: Path, tmp_path: Path) -> None:
    printed = run_example("federate_three_folders.py", synthetic_root, "stripes,disc,grain", cwd=tmp_path)
    assert printed.count("image AUROC") == 3, printed[-2000:]
    assert (tmp_path / "results" / "federate_three_folders" / "metrics.csv").is_file()
