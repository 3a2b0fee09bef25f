"""Clients' anomalib datamodules: products from folders, and a partition's share of them.

A client's datamodule is built by filtering the products' own datasets (their ``samples``
DataFrames), so it works for any anomalib image datamodule and keeps anomalib's image/mask
loading. Products of different image sizes are resized in the datasets so they batch together.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from anomalib.data.datamodules.base.image import AnomalibDataModule
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Resize

from anomalib_feddymem.data import folder_datamodule

from .partition import ClientPartition, PartitionError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anomalib.data.datasets.base.image import AnomalibDataset

__all__ = [
    "ClientDataModule",
    "client_datamodules",
    "datamodule_from_spec",
    "named_products",
    "product_name",
    "product_sizes",
]


class ClientDataModule(AnomalibDataModule):
    """One client's share: given train and test datasets, used as they are.

    anomalib's ``setup`` would re-split the test set (and drop its normal images under
    ``TestSplitMode.NONE``); a client's datasets are final, so ``setup`` only applies the
    augmentations (and the model's resize when attached to a trainer, as anomalib does).
    """

    def __init__(
        self,
        name: str,
        train_data: AnomalibDataset,
        test_data: AnomalibDataset,
        product_test_data: Mapping[str, AnomalibDataset] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self._name = name
        self.train_data = train_data
        self.test_data = test_data
        self.val_data = test_data
        #: Each held product's own test set: products with and without masks keep their task.
        self.product_test_data = dict(product_test_data or {})
        # anomalib applies augmentations only in ``setup``, which ``Engine`` calls but a bare
        # ``test_dataloader()`` does not: without this, a module never given to an Engine yielded
        # images at their stored size (256 px) instead of the benchmark's size.
        self._update_augmentations()

    def product_test_dataloaders(self) -> dict[str, DataLoader]:
        """One test dataloader per held product (same augmentations as :meth:`test_dataloader`)."""
        loaders = {}
        for product, dataset in self.product_test_data.items():
            dataset.augmentations = self.test_augmentations
            loaders[product] = DataLoader(
                dataset=dataset,
                shuffle=False,
                batch_size=self.eval_batch_size,
                num_workers=self.num_workers,
                collate_fn=dataset.collate_fn,
            )
        return loaders

    @property
    def name(self) -> str:
        """The client's name, e.g. ``client_0``."""
        return self._name

    def _setup(self, _stage: str | None = None) -> None:
        """Nothing to set up: the datasets are given."""

    def setup(self, stage: str | None = None) -> None:
        """Apply augmentations only (no re-splitting)."""
        del stage
        self._update_augmentations()


def product_name(spec: str | Mapping[str, object]) -> str:
    """A product's name: a folder name as given, or an anomalib datamodule's ``name``/``category``."""
    if isinstance(spec, str):
        return spec
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        msg = f"Product {dict(spec)}: init_args must be a mapping."
        raise PartitionError(msg)
    name = init_args.get("name") or init_args.get("category") or str(spec.get("class_path", "")).split(".")[-1]
    return str(name)


def datamodule_from_spec(spec: Mapping[str, object], *, seed: int = 0) -> AnomalibDataModule:
    """An anomalib datamodule given as anomalib's configs give data: ``{class_path, init_args}``.

    Raises:
        PartitionError: no ``class_path``, an unknown datamodule class, or arguments it refuses.
    """
    from anomalib.data import get_datamodule

    if "class_path" not in spec:
        msg = f"Product {dict(spec)} has no class_path (e.g. anomalib.data.MVTecAD or anomalib.data.Folder)."
        raise PartitionError(msg)
    init_args = {"seed": seed, "num_workers": 0, **dict(spec.get("init_args") or {})}
    try:
        return get_datamodule({"class_path": spec["class_path"], "init_args": init_args})
    except Exception as error:  # anomalib raises its own types (unknown class, bad arguments, missing folders)
        msg = f"Product {product_name(spec)!r} ({spec['class_path']}): {type(error).__name__}: {error}"
        raise PartitionError(msg) from error


def named_products(
    entries: Sequence[str | Mapping[str, object]],
    data_root: str | Path | None,
    *,
    check_images: bool = True,
    seed: int = 0,
) -> dict[str, AnomalibDataModule]:
    """Products by name, in the order given: folder names and anomalib datamodules.

    A string is a folder of ``data_root`` (a validated MVTec-layout folder); a mapping is an
    anomalib datamodule given as ``{class_path, init_args}``.

    Raises:
        PartitionError: no product, a name given twice, or a folder name without ``data_root``.
        DatasetFolderError: a named folder is missing or unusable (the message names it).
    """
    if not entries:
        msg = f"No datasets named: pass --datasets a,b,... (folders of {data_root})."
        raise PartitionError(msg)
    names = [product_name(entry) for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        msg = f"--datasets names {duplicates} more than once."
        raise PartitionError(msg)
    products: dict[str, AnomalibDataModule] = {}
    for name, entry in zip(names, entries, strict=True):
        if not isinstance(entry, str):
            products[name] = datamodule_from_spec(entry, seed=seed)
        elif data_root is None:
            msg = f"Product {name!r} is a folder name, but no data_root says where its folder is."
            raise PartitionError(msg)
        else:
            products[name] = folder_datamodule(Path(data_root) / name, check_images=check_images, seed=seed)
    return products


def product_sizes(products: Mapping[str, AnomalibDataModule]) -> dict[str, int]:
    """Number of normal training samples of every product (sets the datamodules up)."""
    sizes = {}
    for name, datamodule in products.items():
        datamodule.setup()
        sizes[name] = len(datamodule.train_data)
    return sizes


def _concat(datasets: Sequence[AnomalibDataset]) -> AnomalibDataset:
    """One dataset with the samples of all ``datasets`` (a copy of the first, like anomalib's ``+``).

    anomalib's ``__add__`` insists on the same dataset class; products of different datasets
    (``Folder``, ``MVTecAD``) share the ``samples`` columns, so their rows concatenate.
    """
    dataset = copy.deepcopy(datasets[0])
    dataset.samples = pd.concat([d.samples for d in datasets], ignore_index=True)
    # pandas drops ``attrs`` when they differ (a product with masks + one without, e.g. headct):
    # segmentation only if every product has masks, else classification (image labels only).
    tasks = {str(d.samples.attrs.get("task", "")) for d in datasets}
    dataset.samples.attrs["task"] = "segmentation" if tasks == {"segmentation"} else "classification"
    return dataset


def client_datamodules(
    products: Mapping[str, AnomalibDataModule],
    partitions: Sequence[ClientPartition],
    *,
    image_size: int | None = None,
    train_batch_size: int = 8,
    eval_batch_size: int = 8,
    num_workers: int = 0,
    seed: int = 0,
) -> list[ClientDataModule]:
    """One datamodule per client from the products' datamodules and a partition.

    Each product's datamodule is set up once; a client's training set is its rows of the
    products' ``train_data``, its test set the full ``test_data`` of every product it holds.
    Fills ``partition.num_test``.

    Args:
        products: product name -> anomalib image datamodule, in the order given to
            :func:`~anomalib_feddymem.federation.partition.partition_indices`.
        partitions: The partition of the same products.
        image_size: Resize images and masks to this square size in the datasets (products of
            different sizes then batch together); ``None`` keeps the datamodules' own.
        train_batch_size: Training batch size of every client datamodule.
        eval_batch_size: Evaluation batch size of every client datamodule.
        num_workers: Dataloader workers of every client datamodule.
        seed: Seed of every client datamodule.
    """
    prepared = {}
    for name, datamodule in products.items():
        datamodule.setup()
        prepared[name] = (datamodule.train_data, datamodule.test_data)
    unknown = {name for part in partitions for name in part.test_products} - set(prepared)
    if unknown:
        msg = f"The partition names product(s) {sorted(unknown)} that were not given; products: {list(prepared)}."
        raise PartitionError(msg)
    augmentations = Resize((image_size, image_size), antialias=True) if image_size else None
    modules = []
    for part in partitions:
        train_sets, test_sets = [], []
        for name in part.test_products:
            train, test = prepared[name]
            if int(part.train[name].max()) >= len(train):
                msg = (
                    f"Product {name!r} has {len(train)} training samples but the partition indexes "
                    f"{int(part.train[name].max())}: it was computed for other data."
                )
                raise PartitionError(msg)
            train_sets.append(train.subsample(part.train[name].tolist()))
            test_sets.append(test)
            part.num_test[name] = len(test)
        modules.append(
            ClientDataModule(
                name=f"client_{part.client_id}",
                train_data=_concat(train_sets),
                test_data=_concat(test_sets),
                product_test_data=dict(zip(part.test_products, test_sets, strict=True)),
                train_batch_size=train_batch_size,
                eval_batch_size=eval_batch_size,
                num_workers=num_workers,
                augmentations=augmentations,
                seed=seed,
            )
        )
    return modules
