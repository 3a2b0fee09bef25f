"""MVTec-layout dataset folders as anomalib ``Folder`` datamodules, validated first.

Layout: ``train/good/*``, ``test/good/*``, ``test/<defect>/*`` and optionally
``ground_truth/<defect>/<stem>_mask.png``. Problems are reported before any training starts,
naming the folder or file: a missing or empty folder, an unreadable image, a missing mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from anomalib.data import Folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetFolderError(ValueError):
    """A dataset folder is missing, empty, or holds an unreadable image."""


@dataclass
class DatasetFolder:
    """What a validated MVTec-layout folder holds."""

    root: Path
    train_images: list[Path]
    test_good: list[Path]
    defects: dict[str, list[Path]] = field(default_factory=dict)
    has_masks: bool = False

    @property
    def name(self) -> str:
        """The dataset's name: its folder name."""
        return self.root.name


def list_images(folder: Path) -> list[Path]:
    """Sorted image files of ``folder`` (not recursive)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def check_image(path: Path) -> None:
    """Raise :class:`DatasetFolderError` naming ``path`` if it is not a readable image."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:  # verify() does not decode pixels; load() does
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        msg = f"Corrupt or unreadable image: {path} ({error})."
        raise DatasetFolderError(msg) from error


def validate_dataset_folder(root: str | Path, *, check_images: bool = True) -> DatasetFolder:
    """Check an MVTec-layout folder and describe it.

    Raises:
        DatasetFolderError: naming the folder or file that is wrong.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"Dataset folder not found: {root}."
        raise DatasetFolderError(msg)
    train = list_images(root / "train" / "good")
    if not train:
        msg = f"No training images in {root / 'train' / 'good'} (expected normal images there)."
        raise DatasetFolderError(msg)
    test_root = root / "test"
    if not test_root.is_dir():
        msg = f"No test folder: {test_root}."
        raise DatasetFolderError(msg)
    test_good = list_images(test_root / "good")
    defects = {
        d.name: list_images(d)
        for d in sorted(test_root.iterdir())
        if d.is_dir() and d.name != "good" and list_images(d)
    }
    if not defects:
        msg = f"No anomalous test images in {test_root}/<defect>/ (needed for AUROC)."
        raise DatasetFolderError(msg)
    gt_root = root / "ground_truth"
    has_masks = gt_root.is_dir()
    if has_masks:
        for defect, images in defects.items():
            for image in images:
                mask = gt_root / defect / f"{image.stem}_mask.png"
                if not mask.is_file():
                    msg = f"Missing mask {mask} for {image} (ground_truth exists, so every defect needs a mask)."
                    raise DatasetFolderError(msg)
    if check_images:
        for path in [*train, *test_good, *(p for images in defects.values() for p in images)]:
            check_image(path)
    return DatasetFolder(root=root, train_images=train, test_good=test_good, defects=defects, has_masks=has_masks)


def folder_datamodule(
    root: str | Path,
    *,
    train_batch_size: int = 16,
    eval_batch_size: int = 16,
    num_workers: int = 0,
    seed: int = 0,
    check_images: bool = True,
) -> Folder:
    """Anomalib ``Folder`` datamodule of a validated MVTec-layout folder (validation = test set)."""
    from anomalib.data import Folder
    from anomalib.data.utils import ValSplitMode

    info = validate_dataset_folder(root, check_images=check_images)
    defects = list(info.defects)
    return Folder(
        name=info.name,
        root=info.root,
        normal_dir="train/good",
        abnormal_dir=[f"test/{d}" for d in defects],
        normal_test_dir="test/good" if info.test_good else None,
        mask_dir=[f"ground_truth/{d}" for d in defects] if info.has_masks else None,
        train_batch_size=train_batch_size,
        eval_batch_size=eval_batch_size,
        num_workers=num_workers,
        val_split_mode=ValSplitMode.SAME_AS_TEST,
        seed=seed,
    )
