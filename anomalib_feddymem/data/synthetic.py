"""The embedded default dataset: synthetic "products" with masked defects, in MVTec AD layout.

``make demo`` and the test-suite run on it, so nothing is downloaded. Each product is a family of
procedurally generated normal images (a textured pattern with small random shifts, tints and
noise); anomalous test images carry a defect (a blob, a scratch or a missing patch) with its
binary mask in ``ground_truth/<type>/<stem>_mask.png``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

PatternFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _stripes(_yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    phase = rng.uniform(0, 2 * np.pi)
    value = 0.5 + 0.4 * np.sin(xx * 0.35 + phase)
    return np.stack([value, value * 0.8 + 0.1, value * 0.6 + 0.2], axis=-1)


def _checker(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shift = rng.integers(0, 8)
    value = (((yy + shift) // 8 + (xx + shift) // 8) % 2) * 0.5 + 0.25
    return np.stack([value * 0.9, value, value * 0.7], axis=-1)


def _disc(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = yy.shape[0]
    cy, cx = size / 2 + rng.normal(0, 1.5, size=2)
    radius = np.hypot(yy - cy, xx - cx)
    value = np.where(radius < size * 0.35, 0.75, 0.15) + 0.05 * np.cos(radius * 0.8)
    return np.stack([value, value * 0.7, value * 0.5], axis=-1)


def _grain(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    phase = rng.uniform(0, 2 * np.pi)
    value = 0.45 + 0.2 * np.sin(yy * 0.15 + 0.3 * np.sin(xx * 0.1) + phase) + 0.05 * np.sin(xx * 0.9)
    return np.stack([value * 1.1, value * 0.8, value * 0.5], axis=-1)


PRODUCTS: dict[str, PatternFn] = {"stripes": _stripes, "checker": _checker, "disc": _disc, "grain": _grain}
DEFECTS = ("blob", "scratch")


def _normal_image(product: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = PRODUCTS[product](yy, xx, rng)
    image = image * rng.uniform(0.95, 1.05) + rng.normal(0, 0.02, size=image.shape)
    return np.clip(image, 0, 1)


def _defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(size // 5, size - size // 5, size=2)
    if kind == "blob":
        radius = rng.uniform(size * 0.06, size * 0.12)
        mask = np.hypot(yy - cy, xx - cx) < radius
        color = rng.uniform(0, 1, size=3)
    else:
        angle = rng.uniform(0, np.pi)
        distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
        mask = (distance < max(1.5, size * 0.02)) & (along < size * 0.3)
        color = np.array([0.05, 0.05, 0.05]) if image.mean() > 0.5 else np.array([0.95, 0.95, 0.95])
    out = image.copy()
    out[mask] = color
    return out, mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def generate_synthetic_dataset(
    root: str | Path,
    products: Sequence[str] = tuple(PRODUCTS),
    *,
    image_size: int = 64,
    train_per_product: int = 12,
    test_good_per_product: int = 4,
    test_defect_per_type: int = 3,
    seed: int = 0,
) -> list[Path]:
    """Write one MVTec-layout folder per product under ``root`` and return their paths.

    Existing folders with the same settings are reused (a ``.complete`` marker records them).
    """
    unknown = [p for p in products if p not in PRODUCTS]
    if unknown:
        msg = f"Unknown synthetic product(s) {unknown}; choose from {sorted(PRODUCTS)}."
        raise ValueError(msg)
    root = Path(root)
    signature = f"{image_size}-{train_per_product}-{test_good_per_product}-{test_defect_per_type}-{seed}"
    folders = []
    for index, product in enumerate(products):
        folder = root / product
        folders.append(folder)
        marker = folder / ".complete"
        if marker.is_file() and marker.read_text() == signature:
            continue
        rng = np.random.default_rng([seed, index])
        for i in range(train_per_product):
            _save(_normal_image(product, image_size, rng), folder / "train" / "good" / f"{i:03d}.png")
        for i in range(test_good_per_product):
            _save(_normal_image(product, image_size, rng), folder / "test" / "good" / f"{i:03d}.png")
        for kind in DEFECTS:
            for i in range(test_defect_per_type):
                image, mask = _defect(_normal_image(product, image_size, rng), kind, rng)
                _save(image, folder / "test" / kind / f"{i:03d}.png")
                _save(mask.astype(np.float64), folder / "ground_truth" / kind / f"{i:03d}_mask.png")
        marker.write_text(signature)
    return folders
