"""The anomaly map: Patchcore's bilinear upsampling and anomalib's Gaussian blur, in both routes.

Eager torch computes the map as two matrix products; an exported graph keeps the upsampling and
the (separable) blur as ops. Both must equal anomalib's own ``GaussianBlur2d`` of the upsampled
scores, at any patch grid and image size, square or not.
"""

from __future__ import annotations

import pytest
import torch
from anomalib.models.components import GaussianBlur2d
from anomalib_feddymem.models.feddymem import anomaly_map
from anomalib_feddymem.models.feddymem.anomaly_map import AnomalyMapGenerator
from torch.nn import functional as F  # noqa: N812


def reference(scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    kernel = 2 * int(4.0 * sigma + 0.5) + 1
    blur = GaussianBlur2d(kernel_size=(kernel, kernel), sigma=(sigma, sigma), channels=1)
    return blur(F.interpolate(scores, size=size, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("exporting", [False, True], ids=["eager", "exported"])
@pytest.mark.parametrize(("grid", "size"), [((32, 32), (256, 256)), ((8, 12), (64, 96)), ((7, 5), (61, 40))])
def test_map_is_anomalib_blur_of_bilinear_upsampling(
    grid: tuple[int, int], size: tuple[int, int], exporting: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(anomaly_map, "is_exporting", lambda: exporting)
    scores = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(0))
    scores[1, 0, grid[0] // 2, grid[1] // 2] = 10.0  # a sharp peak: the blur's tails and borders matter
    generated = AnomalyMapGenerator()(scores, size)
    assert generated.shape == (2, 1, *size)
    torch.testing.assert_close(generated, reference(scores, size), atol=1e-5, rtol=1e-5)


def test_eager_matrices_are_cached_per_size_and_the_cache_stays_small() -> None:
    generator = AnomalyMapGenerator()
    scores = torch.rand(1, 1, 4, 4)
    generator(scores, (32, 32))
    first = generator.axis_matrix(4, 32, scores)
    generator(scores, (32, 32))
    assert generator.axis_matrix(4, 32, scores) is first, "one size builds its matrix once"
    for pixels in range(33, 60):
        generator(scores, (pixels, pixels))
    assert len(generator._axis_matrices) <= 16
