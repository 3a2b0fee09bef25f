"""Products given the way anomalib's configs give data: ``class_path`` + ``init_args``.

An ``MVTecAD`` tree and a ``Folder`` tree, each generated in its own layout, federate through
``feddymem simulate --config`` and load as a site's ``products:`` YAML.
"""

from __future__ import annotations

import csv
import shutil
from typing import TYPE_CHECKING

import pytest
import yaml
from anomalib_feddymem.federation.partition import PartitionError

if TYPE_CHECKING:
    from pathlib import Path

MODEL = {"memory_ratio": 1.0, "memory_size": 64, "global_memory_size": 48, "reduce_ratio": 2,
         "embedding_dim": 32, "upload_precision": "float32"}  # fmt: skip


@pytest.fixture
def products(synthetic_root: Path, tmp_path: Path) -> list[dict[str, object]]:
    """An MVTecAD tree (the synthetic ``stripes``, already in MVTec AD's layout) and a Folder tree."""
    tiles = tmp_path / "tiles"
    shutil.copytree(synthetic_root / "disc" / "train" / "good", tiles / "ok")
    shutil.copytree(synthetic_root / "disc" / "test" / "good", tiles / "ok_test")
    (tiles / "bad").mkdir()
    for defect in ("blob", "scratch"):
        for image in (synthetic_root / "disc" / "test" / defect).iterdir():
            shutil.copy(image, tiles / "bad" / f"{defect}_{image.name}")
    return [
        {"class_path": "anomalib.data.MVTecAD", "init_args": {"root": str(synthetic_root), "category": "stripes"}},
        {"class_path": "anomalib.data.Folder",
         "init_args": {"name": "tiles", "root": str(tiles), "normal_dir": "ok", "normal_test_dir": "ok_test",
                       "abnormal_dir": "bad"}},
    ]  # fmt: skip


def test_products_from_class_paths_are_named_and_sized(products: list[dict[str, object]]) -> None:
    from anomalib_feddymem.federation.datamodules import named_products, product_sizes

    datamodules = named_products(products, None)
    assert list(datamodules) == ["stripes", "tiles"]
    assert product_sizes(datamodules) == {"stripes": 8, "tiles": 8}


def test_a_bad_product_is_refused_naming_it() -> None:
    from anomalib_feddymem.federation.datamodules import named_products

    with pytest.raises(PartitionError, match=r"Product 'nope' \(anomalib\.data\.NoSuchData\)"):
        named_products([{"class_path": "anomalib.data.NoSuchData", "init_args": {"name": "nope"}}], None)
    with pytest.raises(PartitionError, match="has no class_path"):
        named_products([{"init_args": {"name": "x"}}], None)
    with pytest.raises(PartitionError, match="'a' is a folder name, but no data_root"):
        named_products(["a", {"class_path": "anomalib.data.Folder", "init_args": {"name": "b", "root": "."}}], None)


@pytest.mark.slow
def test_feddymem_simulate_with_datamodule_products(products: list[dict[str, object]], tmp_path: Path) -> None:
    from anomalib_feddymem.cli import main

    config = tmp_path / "products.yaml"
    config.write_text(yaml.safe_dump({"datasets": products, "clients": 2, "partition": "category", "rounds": 1,
                                      "image_size": 64, "batch_size": 4, "model": MODEL}))  # fmt: skip
    assert main(["simulate", "--config", str(config), "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    with (tmp_path / "run" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["status"] for row in rows] == ["ok", "ok"]
    with (tmp_path / "run" / "partition.csv").open() as file:
        held = {(row["client"], row["product"]) for row in csv.DictReader(file) if int(row["train_images"]) > 0}
    assert held == {("0", "stripes"), ("1", "tiles")}


def test_a_site_yaml_lists_its_products(products: list[dict[str, object]], tmp_path: Path) -> None:
    from anomalib_feddymem.federation.build import site_products

    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"products": products}))
    assert list(site_products(site)) == ["stripes", "tiles"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("products: []\n")
    from anomalib_feddymem.data import DatasetFolderError

    with pytest.raises(DatasetFolderError, match=r"empty\.yaml: expected a non-empty `products:` list"):
        site_products(empty)
