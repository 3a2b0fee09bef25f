"""FedDyMem as an anomalib model (``AnomalibModule``).

With one client and one round this is the centralised FedDyMem that ``anomalib train --model
FedDyMem`` trains: the client's patch embeddings initialise its dynamic memory bank, each local
epoch moves the bank's items to the mean of the embeddings they cover (and, with
``use_generator``, trains the memory generator with the metric loss), and the bank is then
memory-reduced and aggregated into the global memory ``G`` that scores test patches. The
federation (:mod:`anomalib_feddymem.federation`) drives the same module through
:meth:`FedDyMem.set_global_memory` and :meth:`FedDyMem.memory_upload`.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib.data import Folder
    >>> from anomalib_feddymem import FedDyMem
    >>> model = FedDyMem(local_epochs=2)
    >>> Engine().fit(model, datamodule=Folder(name="bottle", root="datasets/bottle",
    ...     normal_dir="train/good", abnormal_dir="test/broken_large"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import timm
import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_feddymem.models.components.export import keep_float32
from anomalib_feddymem.registration import attach_model

from .loss import MemoryMetricLoss
from .memory import (
    GROUPING_METHODS,
    MEMORY_INIT_METHODS,
    UPLOAD_PRECISIONS,
    DynamicMemory,
    aggregate_memories,
    memory_reduce,
    nearest_k_items,
)
from .torch_model import FedDyMemModel

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger(__name__)

#: The opset of the ONNX export (the dynamo exporter's native one: nothing to convert).
ONNX_OPSET = 18


class FedDyMem(AnomalibModule):
    """FedDyMem: federated dynamic memory for unsupervised anomaly detection.

    Every argument is a CLI/YAML option (``--model.memory_size 8192``). Defaults are those of
    ``DESIGN.md`` where it gives one and were measured on ``../shared/data`` otherwise.

    Args:
        backbone: timm backbone; ``tf_efficientnet_lite0`` has offline ImageNet weights.
        layers: Backbone feature layers (two mid-level stages, as PatchCore).
        pre_trained: Load ImageNet weights.
        embedding_dim: ``d``, output dimension of the memory generator; ``None`` (default) keeps
            the backbone features' dimension, so that the generator starts as a rotation that
            preserves PatchCore's distances. A smaller ``d`` sends fewer bytes per item.
        use_generator: Train the memory generator ``g`` with the metric loss (the abstract's learned
            part). Off by default: on the dev data the trained generator cost federated AUROC (it
            pulls normal embeddings onto the few items of ``G``), so ``g`` stays its initial fixed
            projection of the backbone features and nothing is trained; at ``d = D`` that is a
            rotation, which keeps PatchCore's distances.
        memory_ratio: ``K_c`` as a fraction of the client's training patches, as Patchcore's
            coreset ratio: the bank (and the upload) follows the client's data, so a small site
            sends little and a large one keeps its rare normal patches.
        memory_size: Most items of the local memory bank, whatever ``memory_ratio`` asks.
        memory_init: How the local bank is initialised from the client's embeddings:
            ``"coreset"`` (k-center greedy, keeps rare normal patches) or ``"kmeans"``.
        global_memory_size: Most items of the global memory ``G``: a union of uploads that fits is
            kept whole, a larger one is grouped by ``aggregation``.
        reduce_ratio: Memory-reduce ratio before upload (``K_c / ratio`` items are sent).
        reduce_method: How memory-reduce groups the bank's items: greedy k-center groups, each
            sent as its k-center item (``"coreset"``, the default: every item stays a real patch,
            so the upload is a coreset of the bank) or as its weighted average (``"kcenter"``, the
            abstract's weighted averages over coverage-keeping groups); or weighted k-means
            groups averaged (``"kmeans"``). Every group carries its total count as its weight.
        aggregation: How the server groups a union larger than ``global_memory_size``: one of
            ``reduce_method``'s choices (``"kmeans"`` warm-starts from the previous ``G``).
        upload_precision: Wire precision of uploaded items: ``"float32"``, ``"float16"``,
            ``"int8"`` (per-dimension affine code over each dimension's range, 4x fewer bytes
            than float32) or ``"int4"`` (16 levels over each dimension's 0.1%-99.9% range, two
            codes a byte: half of int8's bytes).
        grow_global_memory: Once a client holds ``G``, its memory-reduce (k-center) uploads only
            the groups of its bank that ``G`` covers worst, and the server adds them to ``G``: the
            global memory grows round by round instead of being rebuilt from the same uploads.
        memory_momentum: EMA momentum of the dynamic memory update: 1 (measured best) moves every hit
            item to the mean of its embeddings under the current generator; 0 disables the update.
        num_nearest: ``K`` of the metric loss (attraction).
        num_hard_negatives: ``J`` of the metric loss (repulsion).
        radius: ``r`` of the metric loss.
        margin: ``alpha`` of the metric loss.
        num_neighbors: Items of ``G`` each test patch is scored against (1 = nearest distance).
        score_fraction: The image score is the mean of the anomaly map's highest
            ``score_fraction`` of pixels (0 = its maximum). Averaging the top 1% was measured
            steadier than the single peak on the dev data (headct above all, whose anomalies are
            large); a defect smaller than that still raises the mean through its blurred peak.
        local_epochs: ``E``, epochs of local training (the trainer's ``max_epochs``).
        learning_rate: AdamW learning rate of the memory generator.
        weight_decay: AdamW weight decay.
        seed: Seed of memory initialisation, memory-reduce and k-means.
        pre_processor, post_processor, evaluator, visualizer: anomalib's components.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pre_trained: bool = True,
        embedding_dim: int | None = None,
        use_generator: bool = False,
        memory_ratio: float = 0.1,
        memory_size: int = 65536,
        memory_init: Literal["coreset", "kmeans"] = "coreset",
        global_memory_size: int = 65536,
        reduce_ratio: float = 4.0,
        reduce_method: Literal["coreset", "kcenter", "kmeans"] = "coreset",
        aggregation: Literal["coreset", "kcenter", "kmeans"] = "coreset",
        upload_precision: Literal["float32", "float16", "int8", "int4"] = "int4",
        grow_global_memory: bool = True,
        memory_momentum: float = 1.0,
        num_nearest: int = 3,
        num_hard_negatives: int = 3,
        radius: float = 1e-5,
        margin: float = 0.1,
        num_neighbors: int = 1,
        score_fraction: float = 0.01,
        local_epochs: int = 1,
        learning_rate: float = 1e-3,
        weight_decay: float = 5e-4,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        _validate_options(
            memory_ratio=memory_ratio,
            reduce_method=reduce_method,
            aggregation=aggregation,
            upload_precision=upload_precision,
            memory_size=memory_size,
            memory_init=memory_init,
            global_memory_size=global_memory_size,
            reduce_ratio=reduce_ratio,
            local_epochs=local_epochs,
            learning_rate=learning_rate,
        )
        if pre_processor is True:  # normalise with this backbone's own mean/std
            pre_processor = self.configure_pre_processor(backbone=backbone)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = FedDyMemModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            embedding_dim=embedding_dim,
            num_neighbors=num_neighbors,
            score_fraction=score_fraction,
        )
        self.model.generator.requires_grad_(use_generator)
        self.local_memory = DynamicMemory(momentum=memory_momentum)
        self.loss = MemoryMetricLoss(
            num_nearest=num_nearest,
            num_hard_negatives=num_hard_negatives,
            radius=radius,
            margin=margin,
        )
        self.memory_ratio = memory_ratio
        self.memory_size = memory_size
        self.memory_init = memory_init
        self.global_memory_size = global_memory_size
        self.reduce_ratio = reduce_ratio
        self.reduce_method = reduce_method
        self.aggregation = aggregation
        self.upload_precision = upload_precision
        self.grow_global_memory = grow_global_memory
        self.local_epochs = local_epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.seed = seed
        # True once a server has sent a global memory: the loss then targets G, not the local bank.
        self.register_buffer("has_global_memory", torch.tensor(data=False))
        self.has_global_memory: torch.Tensor
        self._memory_stale = False

    # ----------------------------------------------------------------- anomalib configuration
    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        backbone: str = "tf_efficientnet_lite0",
    ) -> PreProcessor:
        """Resize to 256 px and normalise with the backbone's own mean/std (0.5 for EfficientNet-Lite)."""
        image_size = image_size or (256, 256)
        cfg = timm.models.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
        mean = list(cfg.mean) if cfg is not None and cfg.mean else [0.485, 0.456, 0.406]
        std = list(cfg.std) if cfg is not None and cfg.std else [0.229, 0.224, 0.225]
        return PreProcessor(transform=Compose([Resize(image_size, antialias=True), Normalize(mean=mean, std=std)]))

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401 - passed through to torch.onnx.export, as anomalib's
    ) -> Path:
        """Anomalib's ONNX export at opset 18, the dynamo exporter's own.

        anomalib asks for opset 14; the exporter then tries to convert its opset-18 graph down and
        fails on ``Pad`` (the blur's reflect padding), printing a traceback although the export
        goes on at 18. Exporting at 18 converts nothing, and the file declares the opset it uses.
        """
        kwargs.setdefault("opset_version", ONNX_OPSET)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(self, *args: object, **kwargs: object) -> Path:
        """Anomalib's OpenVINO export, with every layer marked to keep float32 (:func:`keep_float32`).

        So that ``OpenVINOInferencer``, ``anomalib predict`` and OpenVINO Model Server get
        torch's answers at OpenVINO's defaults, also on CPUs that would otherwise use bfloat16.
        """
        path = super().to_openvino(*args, **kwargs)
        keep_float32(path)
        return path

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Anomalib's one-class post-processor (thresholds and normalisation from validation)."""
        return PostProcessor()

    @property
    def use_generator(self) -> bool:
        """Whether the memory generator trains: fixed at construction, which sets its ``requires_grad``."""
        return any(parameter.requires_grad for parameter in self.model.generator.parameters())

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """The memory generator's parameters, empty for the no-training ablations."""
        return [p for p in self.model.generator.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """AdamW over the memory generator, or nothing for the no-training ablations."""
        parameters = self._trainable_parameters()
        if not parameters:
            return None
        return torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """``local_epochs`` epochs, no sanity validation (there is no memory before training)."""
        return {"max_epochs": self.local_epochs, "gradient_clip_val": 0, "num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS

    # ----------------------------------------------------------------- federation interface
    def set_global_memory(self, memory: torch.Tensor) -> None:
        """Receive the server's global memory: scoring uses it and training now targets it."""
        self.model.set_memory(memory)
        self.has_global_memory.fill_(value=True)

    def memory_upload(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory-reduced local bank ``(items, weights)``: all that leaves a client.

        With ``grow_global_memory`` and a global memory received, only what ``G`` lacks.
        """
        if self.local_memory.is_empty:
            msg = "The local memory is empty: train the client before uploading."
            raise RuntimeError(msg)
        items, counts = self.local_memory.items.cpu(), self.local_memory.counts.cpu()
        covered = self.model.memory.cpu() if self.grow_global_memory and bool(self.has_global_memory) else None
        return memory_reduce(
            items, counts, self.reduce_ratio, seed=self.seed, method=self.reduce_method, covered=covered
        )

    def refresh_scoring_memory(self) -> None:
        """Centralised mode: ``G`` = aggregation of this single client's upload."""
        previous = self.model.memory.cpu() if self.model.memory.numel() else None
        memory, _ = aggregate_memories(
            [self.memory_upload()], self.global_memory_size, seed=self.seed, previous=previous, method=self.aggregation
        )
        self.model.set_memory(memory)

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def _embeddings_of(self, dataloader: Iterable[Batch]) -> torch.Tensor:
        """Patch embeddings of every image of ``dataloader`` (pre-processed like training batches)."""
        rows = []
        for batch in dataloader:
            images = batch.image.to(self.device)
            if isinstance(self.pre_processor, PreProcessor) and self.pre_processor.transform is not None:
                images = self.pre_processor.transform(images)
            rows.append(self.model.flatten(self.model.embed(images)).cpu())
        if not rows:
            msg = "The training dataloader is empty: FedDyMem needs normal training images."
            raise ValueError(msg)
        return torch.cat(rows)

    def on_train_start(self) -> None:
        """Initialise the local memory from the client's own embeddings (``memory_init``), once."""
        if self.local_memory.is_empty:
            embeddings = self._embeddings_of(self.trainer.train_dataloader)
            size = min(self.memory_size, max(1, math.ceil(self.memory_ratio * embeddings.shape[0])))
            self.local_memory.initialize(embeddings, size, seed=self.seed, method=self.memory_init)
            self.local_memory.to(self.device)
            logger.info(
                "Initialised local memory: %d items from %d patches.", len(self.local_memory.items), len(embeddings)
            )
        if not bool(self.has_global_memory):
            self.refresh_scoring_memory()

    def _loss_target(self) -> torch.Tensor:
        return self.model.memory if bool(self.has_global_memory) else self.local_memory.items

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Metric loss of the batch's normal patches; their embeddings feed the dynamic memory."""
        del args, kwargs
        embeddings = self.model.flatten(self.model(batch.image))
        if not torch.isfinite(embeddings).all():
            msg = "Non-finite embeddings in a training batch (check the input images and learning rate)."
            raise FloatingPointError(msg)
        self._memory_stale = True
        if not self._trainable_parameters():
            self.local_memory.accumulate(embeddings)
            return None
        target = self._loss_target()
        neighbors = nearest_k_items(embeddings, target, self.loss.num_neighbors(target.shape[0]))
        # Centralised training targets the local bank itself: its nearest item is the assignment.
        self.local_memory.accumulate(embeddings, neighbors[:, 0] if target is self.local_memory.items else None)
        loss = self.loss(embeddings, target, neighbors)
        self.log("train_loss", loss.item(), on_epoch=True, prog_bar=True, logger=True, batch_size=batch.image.shape[0])
        return {"loss": loss}

    def finish_local_epoch(self) -> None:
        """Apply the dynamic memory update and, in centralised mode, rebuild ``G`` (idempotent)."""
        if not self._memory_stale:
            return
        if self.local_memory.momentum > 0:
            self.local_memory.update()
        else:
            self.local_memory.reset_accumulators()  # ablation: no dynamic update
        if not bool(self.has_global_memory):
            self.refresh_scoring_memory()
        self._memory_stale = False

    def on_validation_epoch_start(self) -> None:
        """Lightning validates before ``on_train_epoch_end``: bring the memory up to date first."""
        self.finish_local_epoch()

    def on_train_epoch_end(self) -> None:
        """Dynamic memory update after every local epoch."""
        self.finish_local_epoch()

    def on_test_start(self) -> None:
        """Never score with a memory older than the generator."""
        self.finish_local_epoch()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly scores and maps against the global memory."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())


def _validate_options(**options: object) -> None:
    """Reject impossible options before anything is built, naming the option."""
    if not 0 < options["memory_ratio"] <= 1:
        msg = f"memory_ratio must be in (0, 1] (a fraction of the client's patches), got {options['memory_ratio']}."
        raise ValueError(msg)
    for name in ("reduce_method", "aggregation"):
        if options[name] not in GROUPING_METHODS:
            msg = f"{name} must be one of {list(GROUPING_METHODS)}, got {options[name]!r}."
            raise ValueError(msg)
    if options["upload_precision"] not in UPLOAD_PRECISIONS:
        msg = f"upload_precision must be one of {list(UPLOAD_PRECISIONS)}, got {options['upload_precision']!r}."
        raise ValueError(msg)
    if options["memory_size"] < 1:
        msg = f"memory_size must be >= 1, got {options['memory_size']}."
        raise ValueError(msg)
    if options["memory_init"] not in MEMORY_INIT_METHODS:
        msg = f"memory_init must be one of {list(MEMORY_INIT_METHODS)}, got {options['memory_init']!r}."
        raise ValueError(msg)
    if options["global_memory_size"] < 1:
        msg = f"global_memory_size must be >= 1, got {options['global_memory_size']}."
        raise ValueError(msg)
    if options["reduce_ratio"] < 1:
        msg = f"reduce_ratio must be >= 1 (the bank can only shrink), got {options['reduce_ratio']}."
        raise ValueError(msg)
    if options["local_epochs"] < 1:
        msg = f"local_epochs must be >= 1, got {options['local_epochs']}."
        raise ValueError(msg)
    if options["learning_rate"] <= 0:
        msg = f"learning_rate must be > 0, got {options['learning_rate']}."
        raise ValueError(msg)


attach_model(FedDyMem)
