"""The client step: local training against the global memory, dynamic update, memory-reduce.

:class:`FedDyMemClient` owns one persistent :class:`~anomalib_feddymem.FedDyMem` module and the
client's datamodule. Every runner calls it through :func:`handle_train` and
:func:`handle_evaluate`, which take and return Flower ``RecordDict`` messages, so the in-process
simulation and the Flower ClientApp run the very same code on the very same wire format. What
leaves the client is only the reduced memory (items + weights) and its metrics: images, features
and generator weights stay.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from lightning.pytorch import Trainer, seed_everything

from anomalib_feddymem.evaluation import EvaluationResult, evaluate, evaluate_pooled
from anomalib_feddymem.models.feddymem import FedDyMem

from .messages import decode_memory, encode_memory

if TYPE_CHECKING:
    from collections.abc import Mapping

logger = logging.getLogger(__name__)

__all__ = [
    "FROZEN_PREFIX",
    "RESERVED_OPTIONS",
    "FedDyMemClient",
    "build_model",
    "handle_evaluate",
    "handle_train",
    "round_seed",
]

#: FedDyMem arguments the federation sets itself (from its own config): ``model`` options may not name them.
RESERVED_OPTIONS = ("local_epochs", "seed", "pre_processor")

#: State-dict prefix of the frozen backbone: rebuilt identically from the options, never saved.
FROZEN_PREFIX = "model.feature_extractor."


def round_seed(seed: int, round_number: int, client_id: int) -> int:
    """Seed of one client's local training in one round (shuffling), independent of history."""
    return int(np.random.SeedSequence([seed, round_number, client_id]).generate_state(1)[0] % (2**31))


def build_model(model_options: Mapping[str, Any], *, image_size: int, local_epochs: int, seed: int) -> FedDyMem:
    """A client's FedDyMem module, seeded so every client (and every restart) builds the same one.

    Args:
        model_options: Further ``FedDyMem`` keyword arguments (memory sizes, backbone, ...).
        image_size: Square input size of the model's pre-processor.
        local_epochs: ``E``.
        seed: Seed of the generator's initialisation and of the memory maths.
    """
    options = dict(model_options)
    for reserved in RESERVED_OPTIONS:
        if reserved in options:
            msg = f"model option {reserved!r} is set by the federation config; remove it from 'model'."
            raise ValueError(msg)
    seed_everything(seed, verbose=False)
    backbone = options.get("backbone", "tf_efficientnet_lite0")
    pre_processor = FedDyMem.configure_pre_processor(image_size=(image_size, image_size), backbone=backbone)
    return FedDyMem(
        **options,
        local_epochs=local_epochs,
        seed=seed,
        pre_processor=pre_processor,
        evaluator=False,
        visualizer=False,
    )


class FedDyMemClient:
    """One federated site: its FedDyMem module, its datamodule and the round of its ``G``.

    Args:
        client_id: The client's index (its partition id).
        model: The client's persistent FedDyMem module (see :func:`build_model`).
        datamodule: The client's anomalib datamodule (normal train images, own test images).
        work_dir: Lightning's ``default_root_dir`` for this client.
        progress: Show Lightning's progress bar during local epochs.
        accelerator: Lightning accelerator (``auto`` uses a GPU when there is one).
    """

    def __init__(
        self,
        client_id: int,
        model: FedDyMem,
        datamodule: Any,  # noqa: ANN401 - any anomalib datamodule
        *,
        work_dir: str | Path | None = None,
        progress: bool = True,
        accelerator: str = "auto",
    ) -> None:
        self.client_id = client_id
        self.model = model
        self.datamodule = datamodule
        self.work_dir = Path(work_dir) if work_dir else None
        self.progress = progress
        self.accelerator = accelerator
        #: Round whose global memory the model holds (-1: none yet).
        self.memory_round = -1

    @property
    def num_train(self) -> int:
        """Normal training images of this client."""
        return len(self.datamodule.train_data)

    @property
    def num_test(self) -> int:
        """Test images of this client's products."""
        return len(self.datamodule.test_data)

    def install_memory(self, memory: np.ndarray | torch.Tensor, round_number: int) -> None:
        """Receive the server's global memory of ``round_number``."""
        self.model.set_global_memory(torch.as_tensor(np.asarray(memory)))
        self.memory_round = round_number

    def fit(self, round_number: int) -> tuple[np.ndarray, np.ndarray]:
        """Train ``E`` local epochs (against ``G`` once installed), then upload the reduced memory."""
        seed_everything(round_seed(self.model.seed, round_number, self.client_id), verbose=False)
        trainer = Trainer(
            max_epochs=self.model.local_epochs,
            accelerator=self.accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.progress,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=self.work_dir,
        )
        self.model.train()  # Lightning keeps the mode it finds; evaluation left the module in eval mode
        trainer.fit(self.model, datamodule=self.datamodule)
        self.model.finish_local_epoch()
        self.model.cpu()
        items, weights = self.model.memory_upload()
        return items.float().numpy(), weights.float().numpy()

    def evaluate(self) -> EvaluationResult:
        """Rank-based image/pixel AUROC of the current model on the client's own test images."""
        self.model.cpu()
        per_product = getattr(self.datamodule, "product_test_dataloaders", None)
        if per_product is not None and self.datamodule.product_test_data:
            # pooled over the client's products; pixel AUROC from the products that have masks
            return evaluate_pooled(self.model, per_product().values())
        return evaluate(self.model, self.datamodule.test_dataloader())

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes during federation (not the frozen backbone)."""
        model_state = {
            key: value.detach().cpu().clone()
            for key, value in self.model.state_dict().items()
            if not key.startswith(FROZEN_PREFIX)
        }
        return {"model": model_state, "memory_round": self.memory_round}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (memory buffers resize themselves: ``DynamicBufferMixin``)."""
        model_state = state["model"]
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        missing = [key for key in missing if not key.startswith(FROZEN_PREFIX)]
        if missing or unexpected:
            msg = f"Client {self.client_id} state does not fit the model: missing {missing}, unexpected {unexpected}."
            raise ValueError(msg)
        self.model.local_memory.reset_accumulators()
        self.memory_round = int(state["memory_round"])

    def save_checkpoint(self, path: str | Path) -> Path:
        """A Lightning checkpoint of the client's model, as ``anomalib train`` writes one.

        ``anomalib predict --ckpt_path`` and ``FedDyMem.load_from_checkpoint`` read it.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                          enable_progress_bar=False, accelerator="cpu", devices=1)  # fmt: skip
        trainer.strategy.connect(self.model.cpu())
        trainer.save_checkpoint(path)
        return path

    def export_openvino(self, export_root: str | Path, image_size: int) -> Path:
        """Export the client's final model to OpenVINO IR, like any anomalib model."""
        self.model.cpu().eval()
        return self.model.to_openvino(export_root=Path(export_root), input_size=(image_size, image_size))


# -------------------------------------------------------------------- message handlers
def _config(content: RecordDict) -> ConfigRecord:
    if "config" not in content:
        msg = "Instruction without a 'config' record."
        raise ValueError(msg)
    return content["config"]


def _receive_memory(client: FedDyMemClient, content: RecordDict, memory_round: int) -> None:
    """Install the global memory sent with an instruction, or check that the one held is current."""
    if "global-memory" in content:
        items, _ = decode_memory(content["global-memory"])
        client.install_memory(items, memory_round)
    elif memory_round >= 0 and client.memory_round != memory_round:
        msg = (
            f"Client {client.client_id} holds the global memory of round {client.memory_round} but round "
            f"{memory_round} was expected and none was sent."
        )
        raise RuntimeError(msg)


def handle_train(client: FedDyMemClient, content: RecordDict) -> RecordDict:
    """Client side of a ``train`` instruction: ``config`` (round, memory-round) [+ ``global-memory``].

    Returns:
        ``upload`` (reduced memory items + weights) and ``metrics`` (train images, seconds).
    """
    config = _config(content)
    round_number = int(config["round"])
    _receive_memory(client, content, int(config["memory-round"]))
    start = time.perf_counter()
    items, weights = client.fit(round_number)
    metrics = MetricRecord({"num-train": client.num_train, "fit-seconds": time.perf_counter() - start})
    upload = encode_memory(items, weights, client.model.upload_precision)
    return RecordDict({"upload": upload, "metrics": metrics})


def handle_evaluate(client: FedDyMemClient, content: RecordDict) -> RecordDict:
    """Client side of an ``evaluate`` instruction: install ``G`` of this round and score own test images.

    Undefined AUROCs (no masks, one class only) are sent as NaN.
    """
    config = _config(content)
    _receive_memory(client, content, int(config["memory-round"]))
    start = time.perf_counter()
    result = client.evaluate()
    metrics = MetricRecord({
        "image-auroc": float("nan") if result.image_auroc is None else result.image_auroc,
        "pixel-auroc": float("nan") if result.pixel_auroc is None else result.pixel_auroc,
        "num-test": result.num_images,
        "eval-seconds": time.perf_counter() - start,
    })
    return RecordDict({"metrics": metrics})
