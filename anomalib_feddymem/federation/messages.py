"""What travels between clients and server, as Flower records (no pickle on the wire).

A memory (an upload ``(items, weights)`` or the global memory ``G``) is an ``ArrayRecord`` of
numpy arrays; byte counts are the sizes of their serialised buffers, exactly what Flower sends.
The in-process simulation goes through the same encoding, so its byte counts and data path are
those of a real deployment.

Items travel at one of :data:`WIRE_PRECISIONS`: ``float32`` as they are, ``float16``, or ``int8``
with a per-dimension affine code (``items-offset`` and ``items-scale``, float32 ``(d,)``): the
quantisation error of a value is at most half a step, ``(max - min) / 510`` of its dimension.
The receiver names the precision it expects, and a record in another dtype is refused.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from anomalib_feddymem.models.feddymem.memory import UPLOAD_PRECISIONS

__all__ = ["WIRE_PRECISIONS", "decode_memory", "encode_memory", "record_nbytes"]

ITEMS = "items"
WEIGHTS = "weights"
OFFSET = "items-offset"
SCALE = "items-scale"
#: Wire precision of memory items -> numpy dtype on the wire.
WIRE_PRECISIONS = {name: np.dtype(name) for name in UPLOAD_PRECISIONS}


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def _check_precision(precision: str) -> np.dtype:
    if precision not in WIRE_PRECISIONS:
        msg = f"wire precision must be one of {list(WIRE_PRECISIONS)}, got {precision!r}."
        raise ValueError(msg)
    return WIRE_PRECISIONS[precision]


def encode_memory(
    items: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray | None = None,
    precision: str | None = None,
) -> ArrayRecord:
    """``ArrayRecord`` with ``items`` ``(K, d)`` and, if given, ``weights`` ``(K,)``.

    Args:
        items: Memory items; sent in their own dtype when ``precision`` is ``None``.
        weights: Item weights, sent as they are (float32 counts).
        precision: A key of :data:`WIRE_PRECISIONS` to convert the items to before sending.
    """
    values = _as_numpy(items)
    arrays = {}
    if precision is not None and _check_precision(precision) != values.dtype:
        values = values.astype(np.float32)
        if precision == "int8":
            low, high = values.min(axis=0), values.max(axis=0)
            scale = np.maximum(high - low, np.finfo(np.float32).tiny) / 255.0
            codes = np.rint((values - low) / scale) - 128
            values = codes.clip(-128, 127).astype(np.int8)
            arrays[OFFSET] = Array(np.ascontiguousarray(low, dtype=np.float32))
            arrays[SCALE] = Array(np.ascontiguousarray(scale, dtype=np.float32))
        else:
            values = values.astype(WIRE_PRECISIONS[precision])
    arrays = {ITEMS: Array(np.ascontiguousarray(values)), **arrays}
    if weights is not None:
        arrays[WEIGHTS] = Array(_as_numpy(weights))
    return ArrayRecord(array_dict=arrays)


def _dequantize(codes: np.ndarray, record: ArrayRecord) -> np.ndarray:
    """float32 items of an int8 record, its affine code checked first."""
    missing = [key for key in (OFFSET, SCALE) if key not in record]
    if missing:
        msg = f"int8 items need {missing} arrays (keys: {list(record.keys())})"
        raise ValueError(msg)
    offset, scale = record[OFFSET].numpy(), record[SCALE].numpy()
    dim = codes.shape[1] if codes.ndim == 2 else None
    for name, value in ((OFFSET, offset), (SCALE, scale)):
        if value.dtype != np.float32 or value.shape != (dim,):
            msg = f"{name} must be float32 of shape ({dim},), got {value.dtype} {value.shape}"
            raise ValueError(msg)
        if not np.isfinite(value).all():
            msg = f"{name} has NaN or infinite values"
            raise ValueError(msg)
    if not (scale > 0).all():
        msg = f"{SCALE} must be positive"
        raise ValueError(msg)
    return (codes.astype(np.float32) + 128) * scale + offset


def decode_memory(record: ArrayRecord, precision: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of :func:`encode_memory`: float32 items (dequantised) and the weights.

    Args:
        record: The received record.
        precision: The wire precision the receiver expects (a key of :data:`WIRE_PRECISIONS`);
            items in another dtype are refused. ``None`` takes the items' dtype as it comes.

    Raises:
        ValueError: a missing entry, items of another dtype than ``precision``, or a bad int8 code;
            the message names it.
    """
    if ITEMS not in record:
        msg = f"Memory record has no {ITEMS!r} array (keys: {list(record.keys())})."
        raise ValueError(msg)
    items = record[ITEMS].numpy()
    if precision is not None and items.dtype != _check_precision(precision):
        msg = f"items must be {precision} on the wire, got {items.dtype}"
        raise ValueError(msg)
    if items.dtype == np.int8:
        items = _dequantize(items, record)
    elif items.dtype == np.float16:
        items = items.astype(np.float32)
    weights = record[WEIGHTS].numpy() if WEIGHTS in record else None
    return items, weights


def record_nbytes(record: ArrayRecord | None) -> int:
    """Serialised size in bytes of the arrays of ``record`` (0 for ``None``)."""
    if record is None:
        return 0
    return int(sum(len(array.data) for array in record.values()))
