"""The round loop shared by every runner: instructions out, uploads in, server step, evaluation.

A runner only provides a :class:`Transport` (how instructions reach clients and replies come
back): :class:`~anomalib_feddymem.federation.transport.InProcessTransport` calls clients in this
process, :class:`~anomalib_feddymem.flower.server_app.FlowerTransport` sends Flower messages.
Everything else, including fault handling, metrics, byte counts and checkpoints, lives here once.

A round ``r``:

1. ``train`` to every client: ``config`` (round, the round of ``G`` it should hold) plus
   ``G_{r-1}`` itself when the client is not known to hold it (byte-counted as download);
2. the server step over the uploads that came back (byte-counted as upload); failed clients and
   rejected uploads are logged and the round continues if ``min_clients`` uploads are valid;
3. ``evaluate`` to every client with ``G_r`` (download): each installs it and reports
   rank-based image/pixel AUROC on its own test images (``evaluation``: after every round, only
   after the last, or never);
4. ``metrics.csv``, ``metrics.png`` and a checkpoint are written.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from flwr.app import ConfigRecord, RecordDict
from rich.console import Console

from .checkpoint import Checkpointer, CheckpointError, ServerState
from .messages import decode_memory, encode_memory, record_nbytes
from .metrics import plot_metrics, round_table, write_metrics_csv
from .server import FederationError, server_step

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    import torch

    from .config import FederationConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ClientFailure",
    "FederationResult",
    "Transport",
    "expected_embedding_dim",
    "model_option",
    "model_options",
    "run_federation",
]


@dataclass
class ClientFailure:
    """A client that raised, or did not reply in time."""

    reason: str


class Transport(Protocol):
    """How the round loop reaches the clients."""

    client_ids: list[int]

    def train(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict[int, RecordDict | ClientFailure]:
        """Send ``train`` instructions; a reply or a failure per client."""

    def evaluate(
        self, round_number: int, instructions: Mapping[int, RecordDict]
    ) -> dict[int, RecordDict | ClientFailure]:
        """Send ``evaluate`` instructions; a reply or a failure per client."""

    def client_states(self) -> dict[int, dict[str, Any]]:
        """States to checkpoint with the server (empty when clients keep their own)."""

    def restore(self, folder: Path) -> None:
        """Restore client states from a checkpoint folder (for ``--resume``)."""

    def export(self, export_root: Path) -> dict[int, Path]:
        """Export each client's final model (OpenVINO); empty when clients export themselves."""


@dataclass
class FederationResult:
    """The outcome of a run."""

    global_memory: torch.Tensor
    global_weights: torch.Tensor
    rows: list[dict[str, Any]]
    output: Path
    exports: dict[int, Path]


def init_defaults(module_class: type, skip: Iterable[str] = ()) -> dict[str, object]:
    """The keyword defaults of an anomalib model's ``__init__``: the options it runs with when not set.

    Not ``self``, anomalib's components (pre/post-processor, evaluator, visualizer) nor ``skip``.
    """
    excluded = {"self", "pre_processor", "post_processor", "evaluator", "visualizer", *skip}
    parameters = inspect.signature(module_class.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name not in excluded}


def model_options(config: FederationConfig) -> dict[str, object]:
    """Every FedDyMem option as the clients use it: ``config.model`` over FedDyMem's defaults.

    Not the arguments the federation sets itself (:data:`~.client.RESERVED_OPTIONS`) nor
    anomalib's components.
    """
    from anomalib_feddymem.models.feddymem import FedDyMem

    from .client import RESERVED_OPTIONS

    return {**init_defaults(FedDyMem, RESERVED_OPTIONS), **config.model}


def model_option(config: FederationConfig, name: str) -> object:
    """A FedDyMem option as the clients use it: from ``config.model`` or FedDyMem's default."""
    return model_options(config)[name]


def expected_embedding_dim(config: FederationConfig) -> int:
    """``d`` of the clients' items: the ``embedding_dim`` option, or the backbone's feature dimension."""
    embedding_dim = model_option(config, "embedding_dim")
    if embedding_dim is not None:
        return int(embedding_dim)
    from anomalib_feddymem.models.feddymem.torch_model import feature_dimension

    return feature_dimension(str(model_option(config, "backbone")), list(model_option(config, "layers")))


def _failure_text(failures: Mapping[int, str]) -> str:
    return "; ".join(f"client {cid}: {reason}" for cid, reason in sorted(failures.items())) or "none"


def _start_state(
    config: FederationConfig, transport: Transport, checkpointer: Checkpointer, resume: bool
) -> ServerState:
    if not resume:
        if checkpointer.exists():
            msg = (
                f"{config.output} already holds a run's checkpoint ({checkpointer.latest_file}): pass --resume to "
                "continue it, or choose another --output."
            )
            raise CheckpointError(msg)
        return ServerState(identity=config.identity())
    state, folder = checkpointer.load()
    if state.identity != config.identity():
        changed = sorted(k for k in config.identity() if state.identity.get(k) != config.identity()[k])
        msg = f"Cannot resume {folder}: it was made with other settings ({changed}); use the original ones."
        raise CheckpointError(msg)
    transport.restore(folder)
    logger.info("Resuming after round %d from %s.", state.round, folder)
    return state


def run_federation(  # noqa: C901 - the round's steps in order, each a few lines
    transport: Transport,
    config: FederationConfig,
    *,
    resume: bool = False,
    console: Console | None = None,
) -> FederationResult:
    """Run (or resume) ``config.rounds`` rounds of FedDyMem over ``transport``.

    Raises:
        FederationError: a round got fewer than ``min_clients`` valid uploads; the checkpoint of
            the last completed round is left intact (``--resume`` continues from it).
        CheckpointError: ``--resume`` without a matching checkpoint, or a checkpoint in the way.
    """
    console = console or Console()
    output = config.output_dir
    output.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(output, keep=config.keep_checkpoints)
    state = _start_state(config, transport, checkpointer, resume)
    size = int(model_option(config, "global_memory_size"))
    embedding_dim = expected_embedding_dim(config)
    precision = str(model_option(config, "upload_precision"))
    for round_number in range(state.round + 1, config.rounds + 1):
        console.rule(f"[bold]Round {round_number}/{config.rounds}")
        previous = state.global_memory
        memory_record = encode_memory(previous) if previous is not None else None
        download = dict.fromkeys(transport.client_ids, 0)
        instructions = {}
        for cid in transport.client_ids:
            content = RecordDict({
                "config": ConfigRecord({
                    "round": round_number,
                    "memory-round": state.round if previous is not None else -1,
                })
            })
            if previous is not None and state.memory_rounds.get(cid) != state.round:
                content["global-memory"] = memory_record
                download[cid] += record_nbytes(memory_record)
            instructions[cid] = content
        replies = transport.train(round_number, instructions)

        uploads, upload_bytes, failures, fit_info, refused = {}, {}, {}, {}, {}
        for cid in transport.client_ids:
            reply = replies.get(cid, ClientFailure("no reply"))
            if isinstance(reply, ClientFailure):
                failures[cid] = reply.reason
                continue
            if "upload" not in reply:
                failures[cid] = f"malformed reply: no 'upload' record (keys: {list(reply.keys())})"
                continue
            upload_bytes[cid] = record_nbytes(reply["upload"])
            try:
                uploads[cid] = decode_memory(reply["upload"], precision)
            except (KeyError, ValueError, TypeError) as error:
                refused[cid] = str(error)
                logger.warning("Rejected the upload of client %s: %s.", cid, error)
                continue
            fit_info[cid] = dict(reply["metrics"]) if "metrics" in reply else {}
        if failures:
            logger.warning("Round %d: %d client(s) failed: %s.", round_number, len(failures), _failure_text(failures))
        where = (
            f"the checkpoint of round {state.round} in {checkpointer.root} is intact (--resume continues from it)"
            if state.round
            else "no round was completed, nothing was checkpointed"
        )
        if len(uploads) < config.min_clients:
            msg = (
                f"Round {round_number}: only {len(uploads)} of {len(transport.client_ids)} clients replied "
                f"(min_clients={config.min_clients}). Failed: {_failure_text(failures)}. Stopping; {where}."
            )
            raise FederationError(msg)
        try:
            result = server_step(
                uploads,
                size=size,
                embedding_dim=embedding_dim,
                max_items=config.max_upload_items,
                seed=config.seed,
                previous=previous,
                min_clients=config.min_clients,
                method=str(model_option(config, "aggregation")),
                grow=bool(model_option(config, "grow_global_memory")),
                previous_weights=state.global_weights,
            )
        except FederationError as error:
            msg = f"Round {round_number}: {error} Failed: {_failure_text(failures)}. Stopping; {where}."
            raise FederationError(msg) from error
        result.rejected.update(refused)
        if result.rejected:
            logger.warning("Round %d: rejected upload(s): %s.", round_number, _failure_text(result.rejected))

        new_record = encode_memory(result.global_memory)
        eval_instructions = {}
        last = round_number == config.rounds
        if config.evaluation == "every_round" or (config.evaluation == "last_round" and last):
            for cid in transport.client_ids:
                eval_instructions[cid] = RecordDict({
                    "config": ConfigRecord({"round": round_number, "memory-round": round_number}),
                    "global-memory": new_record,
                })
                download[cid] += record_nbytes(new_record)
        eval_replies = transport.evaluate(round_number, eval_instructions) if eval_instructions else {}
        eval_failures = {}
        for cid in transport.client_ids:
            reply = eval_replies.get(cid, ClientFailure("no reply"))
            metrics: dict[str, Any] = {}
            if not eval_instructions:
                pass  # not evaluated this round: the client gets G_r with the next train instruction
            elif isinstance(reply, ClientFailure):
                eval_failures[cid] = reply.reason
            else:
                metrics = dict(reply["metrics"])
                state.memory_rounds[cid] = round_number
            if cid in failures:
                status = f"failed: {failures[cid]}"
            elif cid in result.rejected:
                status = f"rejected: {result.rejected[cid]}"
            elif cid in eval_failures:
                status = f"eval failed: {eval_failures[cid]}"
            else:
                status = "ok"
            state.rows.append({
                "round": round_number,
                "client": cid,
                "image_auroc": metrics.get("image-auroc"),
                "pixel_auroc": metrics.get("pixel-auroc"),
                "upload_bytes": upload_bytes.get(cid, 0),
                "download_bytes": download[cid],
                "status": status,
                "train_images": fit_info.get(cid, {}).get("num-train"),
                "test_images": metrics.get("num-test"),
                "global_memory_items": int(result.global_memory.shape[0]),
                "fit_seconds": fit_info.get(cid, {}).get("fit-seconds"),
                "eval_seconds": metrics.get("eval-seconds"),
            })
        if eval_failures:
            logger.warning("Round %d: evaluation failed on %s.", round_number, _failure_text(eval_failures))

        state.round = round_number
        state.global_memory = result.global_memory
        state.global_weights = result.weights
        folder = checkpointer.save(state, transport.client_states())
        write_metrics_csv(state.rows, output / "metrics.csv")
        plot_metrics(state.rows, output / "metrics.png")
        console.print(round_table(state.rows, round_number))
        logger.info("Round %d done: G has %d items; checkpoint %s.", round_number, len(result.global_memory), folder)

    if state.global_memory is None:
        msg = f"Nothing to do: rounds={config.rounds} and the checkpoint already completed round {state.round}."
        raise FederationError(msg)
    write_metrics_csv(state.rows, output / "metrics.csv")
    exports = transport.export(output / "exports") if config.export_openvino else {}
    return FederationResult(
        global_memory=state.global_memory,
        global_weights=state.global_weights,
        rows=state.rows,
        output=output,
        exports=exports,
    )
