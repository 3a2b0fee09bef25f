"""Partition schemes: counts, determinism, skew, empty-client errors, client datamodules."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from anomalib_feddymem.data import DatasetFolderError
from anomalib_feddymem.federation.partition import (
    PartitionError,
    partition_indices,
    partition_table,
    save_partition_summary,
)

SIZES = {"a": 30, "b": 20, "c": 10}


def _check_exact_cover(parts, sizes=SIZES) -> None:
    """Every training image of every product is held by exactly one client."""
    for name, size in sizes.items():
        held = np.concatenate([p.train[name] for p in parts])
        assert sorted(held.tolist()) == list(range(size)), name


def _as_lists(parts) -> list[dict[str, list[int]]]:
    return [{k: v.tolist() for k, v in p.train.items()} for p in parts]


def test_category_one_product_per_client():
    parts = partition_indices(SIZES, 3, "category", seed=0)
    assert [p.test_products for p in parts] == [["a"], ["b"], ["c"]]
    assert [p.num_train for p in parts] == [30, 20, 10]
    _check_exact_cover(parts)


def test_category_more_clients_than_products_shares_products():
    parts = partition_indices(SIZES, 5, "category", seed=0)
    # clients 0 and 3 share product a, clients 1 and 4 share b, client 2 holds c
    assert [p.test_products for p in parts] == [["a"], ["b"], ["c"], ["a"], ["b"]]
    assert [p.num_train for p in parts] == [15, 10, 10, 15, 10]
    _check_exact_cover(parts)


def test_category_fewer_clients_than_products():
    parts = partition_indices(SIZES, 2, "category", seed=0)
    assert [p.test_products for p in parts] == [["a", "c"], ["b"]]
    _check_exact_cover(parts)


def test_iid_equal_sizes_and_cover():
    parts = partition_indices(SIZES, 4, "iid", seed=1)
    counts = [p.num_train for p in parts]
    assert sum(counts) == 60
    assert max(counts) - min(counts) <= 1
    assert all(len(p.test_products) >= 2 for p in parts)  # a random pool mixes products
    _check_exact_cover(parts)


def test_dirichlet_deterministic_and_seed_dependent():
    first = partition_indices(SIZES, 4, "dirichlet", alpha=0.5, seed=3)
    again = partition_indices(SIZES, 4, "dirichlet", alpha=0.5, seed=3)
    other = partition_indices(SIZES, 4, "dirichlet", alpha=0.5, seed=4)
    assert _as_lists(first) == _as_lists(again)
    assert _as_lists(first) != _as_lists(other)
    _check_exact_cover(first)
    assert all(p.num_train > 0 for p in first)


def test_dirichlet_alpha_controls_skew():
    sizes = dict.fromkeys("abcd", 200)

    def dominance(alpha: float) -> float:
        parts = partition_indices(sizes, 4, "dirichlet", alpha=alpha, seed=0)
        shares = [max(len(v) for v in p.train.values()) / p.num_train for p in parts]
        return float(np.mean(shares))

    assert dominance(0.1) > 0.7  # each client dominated by one product
    assert dominance(100.0) < 0.4  # near-uniform mixes (0.25 is perfectly uniform)


def test_quantity_unequal_sizes():
    parts = partition_indices({"a": 100, "b": 100}, 4, "quantity", alpha=0.5, seed=0)
    counts = [p.num_train for p in parts]
    assert sum(counts) == 200
    assert min(counts) > 0
    assert max(counts) >= 2 * min(counts)
    assert _as_lists(parts) == _as_lists(partition_indices({"a": 100, "b": 100}, 4, "quantity", alpha=0.5, seed=0))
    _check_exact_cover(parts, {"a": 100, "b": 100})


@pytest.mark.parametrize("scheme", ["category", "iid", "dirichlet", "quantity"])
def test_more_clients_than_images_fails_clearly(scheme):
    with pytest.raises(PartitionError, match="training image"):
        partition_indices({"a": 2, "b": 1}, 4, scheme, alpha=0.5)


def test_category_product_too_small_for_its_clients():
    with pytest.raises(PartitionError, match="'b' has 1 training images but is shared by 2 clients"):
        partition_indices({"a": 10, "b": 1}, 4, "category")


def test_dirichlet_that_always_starves_a_client_fails():
    with pytest.raises(PartitionError, match="leaves a client with no training images"):
        partition_indices({"a": 3}, 3, "dirichlet", alpha=0.001, seed=0)


def test_bad_options_are_named():
    with pytest.raises(PartitionError, match="Unknown partition scheme 'random'"):
        partition_indices(SIZES, 2, "random")
    with pytest.raises(PartitionError, match="--alpha must be > 0"):
        partition_indices(SIZES, 2, "dirichlet", alpha=0)
    with pytest.raises(PartitionError, match="--clients must be >= 1"):
        partition_indices(SIZES, 0, "iid")


def test_summary_table_saved(tmp_path):
    parts = partition_indices(SIZES, 2, "category")
    for part in parts:
        part.num_test = dict.fromkeys(part.test_products, 7)
    path = save_partition_summary(parts, tmp_path, scheme="category", alpha=0.5, seed=0, print_table=False)
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert rows == [
        {"client": "0", "product": "a", "train_images": "30", "test_images": "7"},
        {"client": "0", "product": "c", "train_images": "10", "test_images": "7"},
        {"client": "1", "product": "b", "train_images": "20", "test_images": "7"},
    ]
    saved = json.loads((tmp_path / "partition.json").read_text())
    assert saved["scheme"] == "category"
    assert saved["clients"][1]["train"]["b"] == list(range(20))
    assert len(partition_table(parts)) == 3


def test_client_datamodules_hold_their_share(tmp_path):
    from anomalib_feddymem.data import generate_synthetic_dataset
    from anomalib_feddymem.federation.datamodules import client_datamodules, named_products, product_sizes

    generate_synthetic_dataset(
        tmp_path,
        ["stripes", "disc"],
        image_size=32,
        train_per_product=5,
        test_good_per_product=2,
        test_defect_per_type=1,
    )
    products = named_products(["stripes", "disc"], tmp_path)
    sizes = product_sizes(products)
    assert sizes == {"stripes": 5, "disc": 5}
    parts = partition_indices(sizes, 2, "dirichlet", alpha=1.0, seed=2)
    modules = client_datamodules(products, parts, image_size=48)
    for part, module in zip(parts, modules, strict=True):
        # no setup(): a module never given to an Engine must already yield image_size images
        assert tuple(next(iter(module.train_dataloader())).image.shape[-2:]) == (48, 48)
        assert len(module.train_data) == part.num_train
        # test set = every test image (2 good + 2 defects) of each held product, labels of both kinds
        assert len(module.test_data) == 4 * len(part.test_products)
        held = {path.split("/")[-4] for path in module.train_data.samples.image_path}
        assert held == set(part.test_products)
        batch = next(iter(module.test_dataloader()))
        assert tuple(batch.image.shape[-2:]) == (48, 48)
        assert set(batch.gt_label.tolist()) == {0, 1} or len(module.test_data) > batch.image.shape[0]
    with pytest.raises(DatasetFolderError, match="nope"):
        named_products(["nope"], tmp_path)
