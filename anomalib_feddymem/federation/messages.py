"""What travels between clients and server, as Flower records (no pickle on the wire).

A memory (an upload ``(items, weights)`` or the global memory ``G``) is an ``ArrayRecord`` of
numpy arrays; byte counts are the sizes of their serialised buffers, exactly what Flower sends.
The in-process simulation goes through the same encoding, so its byte counts and data path are
those of a real deployment.

Items travel at one of :data:`WIRE_PRECISIONS`: ``float32`` as they are, ``float16``, or an
affine code per dimension (``items-offset`` and ``items-scale``, float32 ``(d,)``, value = offset +
code * scale): ``int8`` spans each dimension's range in 256 levels, so a value is off by at most
``(max - min) / 510``; ``int4`` packs two 16-level codes into a byte (``uint8`` ``(K, ceil(d / 2))``,
even dimensions in the high nibble) over each dimension's 0.1%-99.9% quantile range, since 16
levels spread over a few outliers would leave the bulk of the items with only a handful. Values
outside that range are clipped to it.
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
#: Wire precision of memory items -> numpy dtype on the wire (int4 codes travel packed in uint8).
WIRE_PRECISIONS = {name: np.dtype("uint8" if name == "int4" else name) for name in UPLOAD_PRECISIONS}
#: Fraction of each dimension's values that int4's range leaves out, at either end.
INT4_CLIP_QUANTILE = 0.001


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
        if precision in {"int8", "int4"}:
            values, low, scale = _quantise(values, bits=8 if precision == "int8" else 4)
            arrays[OFFSET] = Array(low)
            arrays[SCALE] = Array(scale)
        else:
            values = values.astype(WIRE_PRECISIONS[precision])
    arrays = {ITEMS: Array(np.ascontiguousarray(values)), **arrays}
    if weights is not None:
        arrays[WEIGHTS] = Array(_as_numpy(weights))
    return ArrayRecord(array_dict=arrays)


def _quantise(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, offset, scale)`` of float32 ``(K, d)`` values: int8 codes, or int4 codes packed in uint8."""
    levels = 2**bits - 1
    if bits == 8:
        low, high = values.min(axis=0), values.max(axis=0)
    else:
        low, high = np.quantile(values, [INT4_CLIP_QUANTILE, 1 - INT4_CLIP_QUANTILE], axis=0)
    low = np.ascontiguousarray(low, dtype=np.float32)
    scale = np.ascontiguousarray(np.maximum(high - low, np.finfo(np.float32).tiny) / levels, dtype=np.float32)
    codes = np.rint((values - low) / scale).clip(0, levels)
    if bits == 8:
        return (codes - 128).astype(np.int8), low, scale
    codes = codes.astype(np.uint8)
    if codes.shape[1] % 2:  # an odd d: pad one zero code, dropped again by the receiver
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray((codes[:, 0::2] << 4) | codes[:, 1::2]), low, scale


def _dequantize(codes: np.ndarray, record: ArrayRecord, precision: str) -> np.ndarray:
    """float32 items of an int8 or int4 record, its affine code checked first."""
    missing = [key for key in (OFFSET, SCALE) if key not in record]
    if missing:
        msg = f"{precision} items need {missing} arrays (keys: {list(record.keys())})"
        raise ValueError(msg)
    if codes.ndim != 2:
        msg = f"{precision} items must be a (K, columns) matrix, got shape {codes.shape}"
        raise ValueError(msg)
    offset, scale = record[OFFSET].numpy(), record[SCALE].numpy()
    columns = codes.shape[1]
    dims = (columns,) if precision == "int8" else (2 * columns - 1, 2 * columns)  # int4: two codes a byte
    for name, value in ((OFFSET, offset), (SCALE, scale)):
        if value.dtype != np.float32 or value.ndim != 1 or value.shape[0] not in dims:
            shapes = " or ".join(f"({d},)" for d in dims)
            msg = f"{name} must be float32 of shape {shapes}, got {value.dtype} {value.shape}"
            raise ValueError(msg)
        if not np.isfinite(value).all():
            msg = f"{name} has NaN or infinite values"
            raise ValueError(msg)
    if offset.shape != scale.shape:
        msg = f"{OFFSET} and {SCALE} must have one value per dimension, got {offset.shape} and {scale.shape}"
        raise ValueError(msg)
    if not (scale > 0).all():
        msg = f"{SCALE} must be positive"
        raise ValueError(msg)
    if precision == "int8":
        return (codes.astype(np.float32) + 128) * scale + offset
    unpacked = np.empty((codes.shape[0], 2 * codes.shape[1]), dtype=np.float32)
    unpacked[:, 0::2] = codes >> 4
    unpacked[:, 1::2] = codes & 15
    return unpacked[:, : offset.shape[0]] * scale + offset


def decode_memory(record: ArrayRecord, precision: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of :func:`encode_memory`: float32 items (dequantised) and the weights.

    Args:
        record: The received record.
        precision: The wire precision the receiver expects (a key of :data:`WIRE_PRECISIONS`);
            items in another dtype are refused. ``None`` takes the items' dtype as it comes.

    Raises:
        ValueError: a missing entry, items of another dtype than ``precision``, or a bad int8 or
            int4 code; the message names it.
    """
    if ITEMS not in record:
        msg = f"Memory record has no {ITEMS!r} array (keys: {list(record.keys())})."
        raise ValueError(msg)
    items = record[ITEMS].numpy()
    if precision is not None and items.dtype != _check_precision(precision):
        msg = f"items must be {precision} on the wire, got {items.dtype}"
        raise ValueError(msg)
    if items.dtype == np.int8:
        items = _dequantize(items, record, "int8")
    elif items.dtype == np.uint8:
        items = _dequantize(items, record, "int4")
    elif items.dtype == np.float16:
        items = items.astype(np.float32)
    weights = record[WEIGHTS].numpy() if WEIGHTS in record else None
    return items, weights


def record_nbytes(record: ArrayRecord | None) -> int:
    """Serialised size in bytes of the arrays of ``record`` (0 for ``None``)."""
    if record is None:
        return 0
    return int(sum(len(array.data) for array in record.values()))
