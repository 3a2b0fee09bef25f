"""FastPatchcore is anomalib's Patchcore, registered by name, bank for bank and checkpoint for checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from conftest import folder_data_options, only_checkpoint, python

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

LITE0 = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"]}


@pytest.mark.slow
def test_get_model_and_the_package_find_fast_patchcore_by_name() -> None:
    result = python(
        """
        from anomalib.models import Patchcore, get_model
        from anomalib.models.components import AnomalibModule
        options = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "pre_trained": False,
                   "coreset_sampling_ratio": 0.05, "num_neighbors": 3}
        models = [
            get_model("FastPatchcore", **options),
            get_model("fastpatchcore", **options),
            get_model({"class_path": "FastPatchcore", "init_args": options}),
            get_model({"class_path": "anomalib.models.FastPatchcore", "init_args": options}),
        ]
        for model in models:
            assert type(model).__name__ == "FastPatchcore" and isinstance(model, Patchcore), type(model)
            assert model.coreset_sampling_ratio == 0.05 and model.model.num_neighbors == 3
        assert type(models[0]) in AnomalibModule.__subclasses__()
        assert type(models[0]).__mro__[1:] == Patchcore.__mro__, "the same behaviour as Patchcore"
        print("OK", type(models[0]).__module__)
        """
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "OK anomalib_feddymem.models.fast_patchcore.lightning_model" in result.stdout


def test_fast_patchcore_takes_every_patchcore_option_with_its_default() -> None:
    import inspect

    from anomalib.models import Patchcore
    from anomalib_feddymem import FastPatchcore

    assert inspect.signature(FastPatchcore.__init__) == inspect.signature(Patchcore.__init__)


def _fit(model_class: type, datamodule: Any, root: Path) -> tuple[Any, Path]:  # noqa: ANN401
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    seed_everything(3, verbose=False)
    model = model_class(**LITE0, pre_trained=True, coreset_sampling_ratio=0.1, evaluator=False, visualizer=False)
    engine = Engine(default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="cpu")
    engine.fit(model, datamodule=datamodule)
    return model, only_checkpoint(root)


def _scores(model: Any, datamodule: Any) -> np.ndarray:  # noqa: ANN401
    from anomalib_feddymem.evaluation import predict

    return predict(model, datamodule.test_dataloader(), with_maps=False).scores


@pytest.mark.slow
def test_same_bank_same_scores_and_checkpoints_load_both_ways(synthetic_folder: Path, tmp_path: Path) -> None:
    from anomalib.models import Patchcore
    from anomalib_feddymem import FastPatchcore
    from anomalib_feddymem.data import folder_datamodule
    from anomalib_feddymem.evaluation import rank_auroc

    datamodule = folder_datamodule(synthetic_folder, train_batch_size=4, eval_batch_size=4)
    fast, fast_ckpt = _fit(FastPatchcore, datamodule, tmp_path / "fast")
    stock, stock_ckpt = _fit(Patchcore, datamodule, tmp_path / "stock")
    assert fast.model.memory_bank.shape[0] == int(0.1 * 8 * 32 * 32)  # 8 images at 256 px: 32 x 32 patches
    assert torch.equal(fast.model.memory_bank, stock.model.memory_bank), "the same coreset, item for item"
    scores = _scores(fast, datamodule)
    np.testing.assert_array_equal(scores, _scores(stock, datamodule))
    labels = np.array([label for batch in datamodule.test_dataloader() for label in batch.gt_label.tolist()])
    assert rank_auroc(scores, labels) == rank_auroc(_scores(stock, datamodule), labels)
    # A FastPatchcore checkpoint is a Patchcore checkpoint, and the reverse.
    as_stock = Patchcore.load_from_checkpoint(fast_ckpt, map_location="cpu")
    as_fast = FastPatchcore.load_from_checkpoint(stock_ckpt, map_location="cpu")
    assert type(as_stock) is Patchcore
    assert type(as_fast) is FastPatchcore
    np.testing.assert_array_equal(_scores(as_stock, datamodule), scores)
    np.testing.assert_array_equal(_scores(as_fast, datamodule), scores)


@pytest.mark.slow
def test_cli_trains_fast_patchcore_by_its_bare_name(
    synthetic_folder: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    cli(
        ["anomalib", "train", "--model", "FastPatchcore", "--model.backbone", "tf_efficientnet_lite0",
         "--model.layers", "[blocks.2, blocks.4]", "--data", "anomalib.data.Folder",
         *folder_data_options(synthetic_folder), "--default_root_dir", tmp_path / "results"],
        cwd=tmp_path,
    )  # fmt: skip
    checkpoint = torch.load(only_checkpoint(tmp_path / "results"), map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["backbone"] == "tf_efficientnet_lite0"
    assert checkpoint["state_dict"]["model.memory_bank"].shape == (int(0.1 * 8 * 32 * 32), 152)
