"""FedDyMem scoring and the Lightning module's memory life cycle.

Scoring: the patch score is the distance to the nearest item of ``G``, the anomaly map is those
scores upsampled and smoothed, the image score is the map's maximum, and nothing depends on
the other images of the batch. Training: the local memory, its counts, the upload and the
global memory keep their documented sizes, and a checkpoint restores all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch
from anomalib_feddymem import FedDyMem, FedDyMemModel
from anomalib_feddymem.evaluation import evaluate

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

EMBEDDING_DIM = 32


@pytest.fixture(scope="module")
def network() -> FedDyMemModel:
    """Untrained network in eval mode; tests install their own memory.

    Its backbone is random, seeded so that every run tests the same network.
    """
    torch.manual_seed(0)
    return FedDyMemModel(backbone="tf_efficientnet_lite0", pre_trained=False, embedding_dim=EMBEDDING_DIM).eval()


def images(batch: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("exporting", [False, True], ids=["eager", "exported-rerank"])
def test_patch_score_is_distance_to_nearest_item(
    network: FedDyMemModel, exporting: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib_feddymem.models.feddymem import torch_model

    monkeypatch.setattr(torch_model, "is_exporting", lambda: exporting)
    memory = torch.randn(10, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0))
    network.set_memory(memory)
    embedding = torch.randn(2, EMBEDDING_DIM, 3, 4, generator=torch.Generator().manual_seed(1))
    embedding[0, :, 0, 0] = memory[4]  # a patch on a memory item
    embedding[0, :, 1, 1] = memory[4] + 100.0  # a patch far from every item
    scores = network.patch_scores(embedding)
    assert scores.shape == (2, 1, 3, 4)
    expected = torch.cdist(network.flatten(embedding), memory).min(dim=1).values.reshape(2, 3, 4)
    # matmul distances: sqrt of a ~1e-5 cancellation error near zero, hence atol 5e-3
    torch.testing.assert_close(scores[:, 0], expected, atol=5e-3, rtol=1e-4)
    assert scores[0, 0, 0, 0] < 1e-2
    assert scores[0, 0, 1, 1] == scores.max(), "the far patch scores highest"


def test_patch_scores_in_reused_blocks_match_cdist_in_and_out_of_inference_mode(
    network: FedDyMemModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks smaller than the queries, a buffer made in inference mode then reused outside it."""
    from anomalib_feddymem.models.feddymem import torch_model

    memory = torch.randn(7, EMBEDDING_DIM, generator=torch.Generator().manual_seed(3))
    network.set_memory(memory)
    network._ranking_block = None
    monkeypatch.setattr(torch_model, "RANKING_BLOCK_ELEMENTS", 5 * 7)  # blocks of 5 queries, the last one short
    embedding = torch.randn(2, EMBEDDING_DIM, 3, 4, generator=torch.Generator().manual_seed(4))
    expected = torch.cdist(network.flatten(embedding), memory).min(dim=1).values.reshape(2, 1, 3, 4)
    with torch.inference_mode():
        first = network.patch_scores(embedding)
    with torch.no_grad():
        second = network.patch_scores(embedding)
    torch.testing.assert_close(first, expected, atol=5e-3, rtol=1e-4)
    torch.testing.assert_close(second, expected, atol=5e-3, rtol=1e-4)
    assert network._ranking_block is not None
    assert network._ranking_block.numel() == 5 * 7


def test_softmin_over_neighbours_lies_between_nearest_and_kth(
    network: FedDyMemModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = torch.randn(10, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0))
    embedding = torch.randn(1, EMBEDDING_DIM, 4, 4, generator=torch.Generator().manual_seed(2))
    network.set_memory(memory)
    distances = torch.cdist(network.flatten(embedding), memory).sort(dim=1).values
    monkeypatch.setattr(network, "num_neighbors", 3)
    scores = network.patch_scores(embedding).flatten()
    assert (scores >= distances[:, 0] - 1e-4).all()
    assert (scores <= distances[:, 2] + 1e-4).all()


def test_image_score_is_mean_of_top_fraction_of_anomaly_map(network: FedDyMemModel) -> None:
    network.set_memory(torch.randn(16, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)))
    output = network(images())
    assert output.anomaly_map.shape == (3, 1, 64, 64), "the map has the input's resolution"
    top = output.anomaly_map.flatten(1).sort(dim=1, descending=True).values[:, : int(0.01 * 64 * 64)]
    torch.testing.assert_close(output.pred_score, top.mean(dim=1))
    assert (output.pred_score < output.anomaly_map.amax(dim=(1, 2, 3))).all(), "a mean, not the peak"


@pytest.mark.parametrize("fraction", [0.0, 1e-6])
def test_image_score_is_max_when_fraction_covers_one_pixel(
    network: FedDyMemModel, fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    network.set_memory(torch.randn(16, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(network, "score_fraction", fraction)
    output = network(images())
    torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(1, 2, 3)))


def test_image_scores_on_hand_made_map(network: FedDyMemModel, monkeypatch: pytest.MonkeyPatch) -> None:
    anomaly_map = torch.zeros(2, 1, 10, 10)
    anomaly_map[0, 0, 0, :3] = torch.tensor([9.0, 6.0, 3.0])  # a 3-pixel peak: top 2% = 2 pixels
    anomaly_map[1, 0, 5, 5] = 4.0
    monkeypatch.setattr(network, "score_fraction", 0.02)
    torch.testing.assert_close(network.image_scores(anomaly_map), torch.tensor([7.5, 2.0]))


@pytest.fixture(scope="module")
def pretrained_network() -> FedDyMemModel:
    """ImageNet (offline wheel) backbone.

    A random one spreads a defect over the whole map, so where the peak lands would depend on the
    random draw rather than on the scoring.
    """
    return FedDyMemModel(backbone="tf_efficientnet_lite0", pre_trained=True, embedding_dim=EMBEDDING_DIM).eval()


def test_own_patches_score_zero_and_defect_scores_highest(pretrained_network: FedDyMemModel) -> None:
    """Memory = a normal image's own patches: it scores ~0, a pasted defect is found where it is."""
    network = pretrained_network
    normal = images(1, seed=3)
    with torch.no_grad():
        network.set_memory(network.flatten(network.embed(normal)))
    defective = normal.clone()
    defective[:, :, 8:24, 40:56] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    output = network(torch.cat([normal, defective]))
    assert output.pred_score[0] < 0.05 * output.pred_score[1]
    row, col = divmod(int(output.anomaly_map[1, 0].argmax()), 64)
    assert 8 <= row < 24, f"peak at {(row, col)} is not inside the defect (rows 8-23, cols 40-55)"
    assert 40 <= col < 56, f"peak at {(row, col)} is not inside the defect (rows 8-23, cols 40-55)"


def test_scores_do_not_depend_on_the_rest_of_the_batch(network: FedDyMemModel) -> None:
    network.set_memory(torch.randn(16, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)))
    batch = images(3)
    together = network(batch)
    alone = network(batch[1:2])
    torch.testing.assert_close(together.pred_score[1:2], alone.pred_score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.anomaly_map[1:2], alone.anomaly_map, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_rebuilds_the_scoring_buffers(network: FedDyMemModel) -> None:
    """Scoring uses buffers derived from G that are not saved: loading G must rebuild them."""
    network.set_memory(torch.randn(16, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0)) + 5)
    state = network.state_dict()
    assert not any(key.startswith(("negated_items", "item_norms", "memory_center")) for key in state)
    restored = FedDyMemModel(backbone="tf_efficientnet_lite0", pre_trained=False, embedding_dim=EMBEDDING_DIM).eval()
    restored.load_state_dict(state)
    batch = images(2)
    torch.testing.assert_close(restored(batch).anomaly_map, network(batch).anomaly_map)


def test_training_mode_returns_embeddings_and_eval_needs_memory() -> None:
    network = FedDyMemModel(backbone="tf_efficientnet_lite0", pre_trained=False, embedding_dim=8)
    embedding = network.train()(images(2))
    assert embedding.shape == (2, 8, 8, 8), "stride-8 patch grid of a 64 px image"
    assert not network.feature_extractor.training, "the frozen backbone stays in eval mode"
    with pytest.raises(RuntimeError, match="no global memory yet"):
        network.eval()(images(1))


def test_untrained_generator_preserves_backbone_distances() -> None:
    """The generator starts as an orthogonal projection: patch distances equal the features'."""
    network = FedDyMemModel(backbone="tf_efficientnet_lite0", pre_trained=False, embedding_dim=192).eval()
    assert network.feature_dim <= 192
    with torch.no_grad():
        x = images(2)
        features = network.flatten(network.extract_features(x))
        embeddings = network.flatten(network.embed(x))
    exact = "donot_use_mm_for_euclid_dist"
    torch.testing.assert_close(
        torch.cdist(embeddings, embeddings, compute_mode=exact),
        torch.cdist(features, features, compute_mode=exact),
        atol=1e-3,
        rtol=1e-3,
    )


# ------------------------------------------------------------------------- lightning life cycle
def test_trained_module_memory_sizes_and_counts(trained_tiny: dict[str, Any]) -> None:
    model: FedDyMem = trained_tiny["model"]
    datamodule = trained_tiny["datamodule"]
    assert model.local_memory.items.shape == (64, 32)
    num_train = len(datamodule.train_data)
    patches_per_image = 8 * 8  # 64 px input, stride-8 layer
    # A sum of integer counts (bincounts stored as float32): abs=0 keeps the comparison exact.
    counts = float(model.local_memory.counts.sum())
    assert counts == pytest.approx(num_train * patches_per_image, abs=0), "counts = patches of the epoch"
    assert 0 < model.model.memory.shape[0] <= model.global_memory_size
    assert model.model.memory.shape[1] == 32
    assert not bool(model.has_global_memory), "centralised training builds G itself"


def test_memory_upload_is_reduced_and_keeps_total_weight(
    make_tiny_model: Callable[..., FedDyMem], trained_tiny: dict[str, Any]
) -> None:
    trained: FedDyMem = trained_tiny["model"]
    client = make_tiny_model(reduce_ratio=4.0)
    with pytest.raises(RuntimeError, match="local memory is empty"):
        client.memory_upload()
    client.local_memory.set(trained.local_memory.items, trained.local_memory.counts)
    items, weights = client.memory_upload()
    assert items.shape[0] <= 16
    assert items.shape[1] == 32
    assert float(weights.sum()) == pytest.approx(float(trained.local_memory.counts.sum()))


def test_global_memory_becomes_the_training_target(make_tiny_model: Callable[..., FedDyMem]) -> None:
    model = make_tiny_model()
    memory = torch.randn(8, 32)
    model.set_global_memory(memory)
    assert bool(model.has_global_memory)
    assert torch.equal(model.model.memory, memory)
    assert torch.equal(model._loss_target(), memory)


@pytest.mark.parametrize("use_generator", [False, True])
def test_generator_is_trained_only_when_switched_on(
    use_generator: bool,
    make_tiny_model: Callable[..., FedDyMem],
    tiny_datamodule: Callable[..., Any],
    synthetic_folder: Path,
    tmp_path: Path,
) -> None:
    """Off (the default) nothing is optimised; on, the metric loss moves the generator's weights."""
    from anomalib.engine import Engine

    model = make_tiny_model(use_generator=use_generator, visualizer=False)
    initial = model.model.generator.conv.weight.detach().clone()
    assert (model.configure_optimizers() is not None) is use_generator
    assert model.use_generator is use_generator, "the attribute reports what actually trains"
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=tiny_datamodule(synthetic_folder))
    moved = float((model.model.generator.conv.weight - initial).abs().max())
    if use_generator:
        assert moved > 0, "the metric loss trained the generator"
        assert "train_loss_epoch" in engine.trainer.logged_metrics
    else:
        assert moved == 0, "the generator stays its initial projection"
    assert model.model.memory.shape[0] > 0, "either way the module ends with a global memory to score with"


def test_trained_tiny_separates_defects_on_synthetic_data(trained_tiny: dict[str, Any]) -> None:
    result = evaluate(trained_tiny["model"], trained_tiny["datamodule"].test_dataloader())
    assert result.image_auroc is not None, result
    assert result.image_auroc >= 0.8, result
    assert result.pixel_auroc is not None, result
    assert result.pixel_auroc >= 0.8, result


def test_checkpoint_restores_memories_and_scores(trained_tiny: dict[str, Any]) -> None:
    model: FedDyMem = trained_tiny["model"]
    restored = FedDyMem.load_from_checkpoint(trained_tiny["ckpt_path"], map_location="cpu").eval()
    assert restored.memory_size == model.memory_size
    assert restored.model.embedding_dim == 32
    assert torch.equal(restored.local_memory.items, model.local_memory.items)
    assert torch.equal(restored.local_memory.counts, model.local_memory.counts)
    assert torch.equal(restored.model.memory, model.model.memory)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(restored.model(x).anomaly_map, model.model(x).anomaly_map)
