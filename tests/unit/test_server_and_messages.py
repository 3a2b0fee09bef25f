"""Server step (upload validation, aggregation, warm start) and the wire format, on hand-made uploads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib_feddymem.federation.messages import decode_memory, encode_memory, record_nbytes
from anomalib_feddymem.federation.server import FederationError, InvalidUploadError, server_step, validate_upload
from flwr.app import Array

DIM = 8


def _upload(k: int = 4, dim: int = DIM, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(k, dim)).astype(np.float32), rng.uniform(1, 5, size=k).astype(np.float32)


# ------------------------------------------------------------------------------ upload validation
def test_valid_upload_passes():
    validate_upload(*_upload(), embedding_dim=DIM, max_items=10)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda i, w: (i.astype(np.float64), w), "dtype must be float32"),
        (lambda i, w: (i, w.astype(np.int64)), "dtype must be float32"),
        (lambda i, w: (i[:, :-1], w), r"items must have shape \(K, 8\)"),
        (lambda i, w: (i[0], w), r"items must have shape \(K, 8\)"),
        (lambda i, w: (i, w[:-1]), r"weights must have shape \(4,\)"),
        (lambda i, w: (np.where(np.eye(4, DIM, dtype=bool), np.nan, i).astype(np.float32), w), "NaN or infinite"),
        (lambda i, _w: (i, np.full(4, np.inf, dtype=np.float32)), "NaN or infinite"),
        (lambda i, w: (i, -w), "non-negative"),
        (lambda _i, _w: (np.zeros((0, DIM), np.float32), np.zeros(0, np.float32)), "empty upload"),
    ],
)
def test_bad_uploads_rejected_with_reason(mutate, reason):
    items, weights = mutate(*_upload())
    with pytest.raises(InvalidUploadError, match=reason):
        validate_upload(items, weights, embedding_dim=DIM, max_items=10)


def test_oversize_upload_rejected():
    with pytest.raises(InvalidUploadError, match="too many items: 11 > max_upload_items=10"):
        validate_upload(*_upload(11), embedding_dim=DIM, max_items=10)


def test_bad_upload_does_not_stop_the_round():
    good, other = _upload(seed=1), _upload(seed=2)
    bad = (good[0].astype(np.float64), good[1])
    nan = (np.full((4, DIM), np.nan, np.float32), good[1])
    result = server_step({0: good, 1: bad, 2: other, 3: nan}, size=3, embedding_dim=DIM, max_items=10, min_clients=2)
    assert result.accepted == [0, 2]
    assert set(result.rejected) == {1, 3}
    assert "float32" in result.rejected[1]
    assert "NaN" in result.rejected[3]
    assert result.global_memory.shape == (3, DIM)


def test_too_few_valid_uploads_is_an_error():
    bad = (np.ones((4, DIM), np.float64), np.ones(4, np.float32))
    with pytest.raises(FederationError, match=r"Only 1 valid upload.*min_clients=2"):
        server_step({0: _upload(), 1: bad}, size=3, embedding_dim=DIM, max_items=10, min_clients=2)


# ------------------------------------------------------------------------ weighted k-means, warm start
def _clusters(seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Two clients whose items lie around the same three centres, with unequal weights."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * DIM, [10.0] * DIM, [-10.0] + [0.0] * (DIM - 1)])
    uploads = {}
    for client in range(2):
        items = np.repeat(centres, 5, axis=0) + rng.normal(scale=0.1, size=(15, DIM))
        uploads[client] = (items.astype(np.float32), rng.integers(1, 10, size=15).astype(np.float32))
    return uploads


@pytest.mark.parametrize("method", ["kcenter", "kmeans"])
def test_aggregation_groups_are_weighted_means_preserving_mass(method):
    uploads = _clusters(0)
    result = server_step(uploads, size=3, embedding_dim=DIM, max_items=100, seed=0, method=method)
    items = np.concatenate([u[0] for u in uploads.values()]).astype(np.float64)
    weights = np.concatenate([u[1] for u in uploads.values()]).astype(np.float64)
    g, w = result.global_memory.double().numpy(), result.weights.double().numpy()
    assert g.shape == (3, DIM)
    np.testing.assert_allclose(w.sum(), weights.sum(), rtol=1e-6)
    np.testing.assert_allclose((g * w[:, None]).sum(0), (items * weights[:, None]).sum(0), rtol=1e-4, atol=1e-3)
    # every centroid is the weighted mean of the items nearest to it
    labels = ((items[:, None] - g[None]) ** 2).sum(-1).argmin(1)
    for k in range(3):
        np.testing.assert_allclose(
            g[k], np.average(items[labels == k], axis=0, weights=weights[labels == k]), atol=1e-4
        )


def test_warm_start_from_previous_global_memory():
    uploads = _clusters(1)
    first = server_step(uploads, size=3, embedding_dim=DIM, max_items=100, seed=0, method="kmeans").global_memory
    # warm-started from G, the result no longer depends on the k-means seed and keeps G's item order
    a = server_step(
        uploads, size=3, embedding_dim=DIM, max_items=100, seed=1, previous=first, method="kmeans"
    ).global_memory
    b = server_step(
        uploads, size=3, embedding_dim=DIM, max_items=100, seed=7, previous=first, method="kmeans"
    ).global_memory
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, first, atol=1e-4, rtol=0)
    permuted = first[[2, 0, 1]]
    c = server_step(
        uploads, size=3, embedding_dim=DIM, max_items=100, seed=0, previous=permuted, method="kmeans"
    ).global_memory
    torch.testing.assert_close(c, permuted, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- messages
def test_memory_record_round_trip_and_bytes():
    items, weights = _upload(16, 32)
    record = encode_memory(torch.from_numpy(items), weights)
    decoded_items, decoded_weights = decode_memory(record)
    np.testing.assert_array_equal(decoded_items, items)
    np.testing.assert_array_equal(decoded_weights, weights)
    # the serialised sizes: the raw buffers plus small npy headers
    assert items.nbytes + weights.nbytes < record_nbytes(record) < items.nbytes + weights.nbytes + 512
    assert record_nbytes(None) == 0
    assert decode_memory(encode_memory(items))[1] is None


@pytest.mark.parametrize("dim", [32, 33])  # int4 packs two codes a byte: an odd d pads one
@pytest.mark.parametrize(("precision", "bytes_per_value"), [("float16", 2), ("int8", 1), ("int4", 0.5)])
def test_quantised_records_round_trip_within_their_step(precision, bytes_per_value, dim):
    rng = np.random.default_rng(0)
    items = (rng.normal(size=(2000, dim)) * rng.uniform(0.1, 5, size=dim)).astype(np.float32)
    weights = rng.uniform(1, 9, size=2000).astype(np.float32)
    record = encode_memory(items, weights, precision)
    decoded, decoded_weights = decode_memory(record, precision)
    assert decoded.dtype == np.float32
    assert decoded.shape == items.shape
    np.testing.assert_array_equal(decoded_weights, weights)
    if precision == "float16":
        np.testing.assert_allclose(decoded, items, rtol=0.01, atol=1e-3)
    elif precision == "int8":  # half a step of each dimension's range
        step = (items.max(0) - items.min(0)) / 255
        assert (np.abs(decoded - items) <= step / 2 + 1e-6).all()
    else:  # half a step of each dimension's 0.1%-99.9% range; values beyond it are clipped to it
        low, high = np.quantile(items, [0.001, 0.999], axis=0)
        clipped = items.clip(low, high)
        assert (np.abs(decoded - clipped) <= (high - low) / 15 / 2 + 1e-5).all()
        assert ((items < low) | (items > high)).mean() < 0.003  # only the tails are clipped
    code = 2 * dim * 4 if precision in {"int8", "int4"} else 0
    payload = int(np.ceil(dim * bytes_per_value)) * len(items) + weights.nbytes + code
    assert payload < record_nbytes(record) < payload + 768


def test_int4_codes_are_packed_two_a_byte_on_hand_made_points():
    items = np.array([[0.0, 0.0, 0.0], [15.0, 15.0, 15.0]], dtype=np.float32)
    record = encode_memory(items, precision="int4")
    # each dimension's range is its 0.1%-99.9% quantiles, 0.015 to 14.985: 15 steps of 0.998
    np.testing.assert_allclose(record["items-offset"].numpy(), [0.015] * 3, rtol=1e-5)
    np.testing.assert_allclose(record["items-scale"].numpy(), [14.97 / 15] * 3, rtol=1e-5)
    codes = record["items"].numpy()
    assert codes.dtype == np.uint8
    assert codes.tolist() == [[0x00, 0x00], [0xFF, 0xF0]]  # dims 0, 1 | dim 2, a zero pad
    decoded, weights = decode_memory(record, "int4")
    assert weights is None
    np.testing.assert_allclose(decoded, [[0.015] * 3, [14.985] * 3], rtol=1e-5)


def test_receiver_refuses_items_of_another_precision_or_a_broken_code():
    items, weights = _upload(8, 4)
    with pytest.raises(ValueError, match="items must be int8 on the wire, got float32"):
        decode_memory(encode_memory(items, weights, "float32"), "int8")
    with pytest.raises(ValueError, match="items must be float32 on the wire, got float16"):
        decode_memory(encode_memory(items, weights, "float16"), "float32")
    record = encode_memory(items, weights, "int8")
    record["items-scale"] = Array(-np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="items-scale must be positive"):
        decode_memory(record, "int8")
    record["items-scale"] = Array(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"items-scale must be float32 of shape \(4,\)"):
        decode_memory(record, "int8")
    del record["items-offset"]
    with pytest.raises(ValueError, match="int8 items need"):
        decode_memory(record, "int8")
    with pytest.raises(ValueError, match="items must be int4 on the wire, got int8"):
        decode_memory(encode_memory(items, weights, "int8"), "int4")
    with pytest.raises(ValueError, match="items must be int8 on the wire, got uint8"):
        decode_memory(encode_memory(items, weights, "int4"), "int8")
    record = encode_memory(items, weights, "int4")  # d = 4: two bytes a row
    record["items-offset"] = Array(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"items-offset must be float32 of shape \(3,\) or \(4,\)"):
        decode_memory(record, "int4")
    record["items-offset"] = Array(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="one value per dimension"):
        decode_memory(record, "int4")
    record["items-scale"] = Array(np.full(4, np.nan, dtype=np.float32))
    record["items-offset"] = Array(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="items-scale has NaN"):
        decode_memory(record, "int4")
    with pytest.raises(ValueError, match="wire precision must be one of"):
        encode_memory(items, weights, "int2")


def test_no_pickle_on_the_wire() -> None:
    """Memories travel as numpy's ``.npy`` bytes, written and read with ``allow_pickle=False``.

    Flower's ``Array`` serialises with ``np.save(..., allow_pickle=False)`` and loads with
    ``np.load(..., allow_pickle=False)``: an array of Python objects (the only numpy payload that
    would need pickle) cannot even be put into a record, and every array of our records is a plain
    numeric buffer that loads without pickle.
    """
    import io

    record = encode_memory(torch.randn(5, 4), torch.ones(5), precision="int8")
    for name, array in record.items():
        assert array.data.startswith(b"\x93NUMPY"), name
        loaded = np.load(io.BytesIO(array.data), allow_pickle=False)
        assert loaded.dtype.kind in "fiu", (name, loaded.dtype)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        Array(np.array([{"code": "anything"}], dtype=object))
