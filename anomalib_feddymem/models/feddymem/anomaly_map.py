"""Patch scores to an image-sized anomaly map, as Patchcore's ``anomaly_map.py`` does.

The map is upsampled bilinearly and smoothed with anomalib's Gaussian blur, computed separably.
Both steps are linear and act on rows and columns apart, so in eager torch the whole map is
``A_y @ S @ A_x^T`` with one ``(H, h)`` and one ``(W, w)`` matrix per size, built once from the
same two steps: a few hundred times fewer operations than blurring the full-size map. Exported
graphs keep the two steps themselves, which take any input size and which OpenVINO keeps in
float32 (a constant-weight matmul it would run in bfloat16).
"""

from __future__ import annotations

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's and anomalib's convention

from anomalib_feddymem.models.components.export import is_exporting

__all__ = ["AnomalyMapGenerator", "SeparableGaussianBlur2d"]


class SeparableGaussianBlur2d(GaussianBlur2d):
    """anomalib's ``GaussianBlur2d`` computed as two 1-D passes.

    The 2-D kernel is the outer product of two 1-D Gaussians, so a vertical then a horizontal pass
    give the same map (up to float rounding) with ``2k`` instead of ``k^2`` operations per pixel,
    which matters at sigma 4 (k = 33), where the blur is a sizeable share of inference.
    """

    def __init__(self, kernel_size: int, sigma: float, channels: int = 1) -> None:
        super().__init__(kernel_size=(kernel_size, kernel_size), sigma=(sigma, sigma), channels=channels)
        line = self.kernel[0, 0].sum(dim=1)  # row sums of the normalised 2-D kernel: the 1-D kernel
        self.register_buffer("kernel_y", line.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), persistent=False)
        self.register_buffer("kernel_x", line.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        """Blur ``(B, C, H, W)`` with anomalib's padding, separably."""
        padded = F.pad(input_tensor, self.padding_shape, mode=self.border_type)
        vertical = F.conv2d(padded, self.kernel_y, groups=self.channels)
        return F.conv2d(vertical, self.kernel_x, groups=self.channels)


class AnomalyMapGenerator(nn.Module):
    """Upsample patch scores to the image and smooth them with a Gaussian (sigma 4 by default)."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        self.blur = SeparableGaussianBlur2d(kernel_size=kernel_size, sigma=sigma, channels=1)
        self._axis_matrices: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def forward(self, patch_scores: torch.Tensor, image_size: torch.Size | tuple[int, int]) -> torch.Tensor:
        """``(B, 1, h, w)`` patch scores to a ``(B, 1, H, W)`` anomaly map."""
        height, width = (int(size) for size in image_size)
        if is_exporting():
            upsampled = F.interpolate(patch_scores, size=(height, width), mode="bilinear", align_corners=False)
            return self.blur(upsampled)
        rows = self.axis_matrix(patch_scores.shape[-2], height, patch_scores)
        columns = self.axis_matrix(patch_scores.shape[-1], width, patch_scores)
        return rows @ patch_scores @ columns.T

    def axis_matrix(self, cells: int, pixels: int, like: torch.Tensor) -> torch.Tensor:
        """``(pixels, cells)``: bilinear upsampling then the blur along one axis, as one matrix.

        Built by passing the identity through the 1-D versions of both steps (same interpolation,
        same reflect padding, same kernel), and cached per size, device and dtype.
        """
        key = (cells, pixels, like.device, like.dtype)
        if key not in self._axis_matrices:
            if len(self._axis_matrices) >= 16:  # a few input sizes in practice; never grow unbounded
                self._axis_matrices.clear()
            line = self.blur.kernel_x.reshape(1, 1, -1).to(device=like.device, dtype=like.dtype)
            padding = line.shape[-1] // 2
            identity = torch.eye(cells, device=like.device, dtype=like.dtype)[:, None, :]
            upsampled = F.interpolate(identity, size=pixels, mode="linear", align_corners=False)
            blurred = F.conv1d(F.pad(upsampled, (padding, padding), mode=self.blur.border_type), line)
            self._axis_matrices[key] = blurred[:, 0, :].T.contiguous()
        return self._axis_matrices[key]
