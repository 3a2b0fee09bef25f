"""Exported IRs that give float32 answers at OpenVINO's defaults.

On CPUs with bfloat16 (AVX512-BF16, AMX) OpenVINO's CPU plugin runs convolutions, matmuls and
interpolations in bfloat16 unless the caller compiles with ``INFERENCE_PRECISION_HINT=f32``.
Anomaly scores are distances between features, and bfloat16's 8-bit mantissa moves them by more
than a threshold can absorb. anomalib's ``OpenVINOInferencer``, ``anomalib predict`` and OpenVINO
Model Server compile with no config, and the CPU plugin ignores an inference-precision hint stored
in the IR's ``runtime_options``. What it does honour, per node, is OpenVINO's "precise" runtime
attribute (``ov::disable_fp16_compression``, serialised as ``<attribute name="precise" .../>``): a
marked node keeps its original (float32) precision. The Python API has no setter for it, so
:func:`keep_float32` writes it into the IR's XML.

The attribute does not survive a node the CPU plugin replaces while compiling: it converts
``Interpolate-11`` to ``Interpolate-4`` and ``Pad-12`` to ``Pad-1``, so :func:`keep_float32` does
those two (lossless) conversions itself before marking. A constant-weight ``MatMul`` still becomes
a bfloat16 ``FullyConnected``; FedDyMem only ranks memory items with it and recomputes the chosen
distances exactly (``FedDyMemModel.patch_scores``).

Eager torch computes in float32 and takes faster routes where an exported graph must not (a
nearest distance straight from the ranking, an anomaly map as two matrix products with cached
matrices): :func:`is_exporting` tells the two apart.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405 - parses our own exporter's output
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["PRECISE_ATTRIBUTE", "downgrade_replaced_ops", "is_exporting", "keep_float32"]

#: ``ov::DisableFP16Compression``'s name and version in the IR (``OPENVINO_RTTI("precise", "0")``).
PRECISE_ATTRIBUTE = {"name": "precise", "version": "0"}


def is_exporting() -> bool:
    """Whether this forward pass is being traced into a graph for another runtime (ONNX, OpenVINO)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def _interpolate_v4(op: Any) -> Any:  # noqa: ANN401 - openvino nodes
    """``Interpolate-4`` equal to the ``Interpolate-11`` node ``op`` (v4 takes both sizes and scales)."""
    from openvino import opset1, opset10

    attributes = op.get_attributes()
    rank = op.input(0).get_partial_shape().rank.get_length()
    sizes_mode = attributes["shape_calculation_mode"] == "sizes"
    unused = opset1.constant(np.ones(rank, dtype=np.float32 if sizes_mode else np.int64))
    sizes, scales = (op.input_value(1), unused) if sizes_mode else (unused, op.input_value(1))
    return opset10.interpolate(
        op.input_value(0), sizes, scales,
        mode=attributes["mode"], shape_calculation_mode=attributes["shape_calculation_mode"],
        pads_begin=attributes["pads_begin"], pads_end=attributes["pads_end"],
        coordinate_transformation_mode=attributes["coordinate_transformation_mode"],
        nearest_mode=attributes["nearest_mode"], antialias=attributes["antialias"],
        cube_coeff=attributes["cube_coeff"], axes=op.input_value(2) if op.get_input_size() > 2 else None,
    )  # fmt: skip


def _pad_v1(op: Any) -> Any | None:  # noqa: ANN401 - openvino nodes
    """``Pad-1`` equal to the ``Pad-12`` node ``op``, or ``None`` when its pads may be negative."""
    from openvino import opset1

    pads = [op.input_value(index).get_node() for index in (1, 2)]
    if not all(pad.get_type_name() == "Constant" and (pad.get_vector() >= 0).all() for pad in pads):
        return None
    value = op.input_value(3) if op.get_input_size() > 3 else None
    return opset1.pad(op.input_value(0), op.input_value(1), op.input_value(2), op.get_attributes()["pad_mode"], value)


def downgrade_replaced_ops(model: Any) -> int:  # noqa: ANN401 - an openvino.Model
    """Convert, in ``model``, the ops the CPU plugin would replace (and so unmark) to their targets.

    Returns:
        The number of nodes converted.
    """
    converted = 0
    for op in model.get_ordered_ops():
        kind, version = op.get_type_name(), op.get_type_info().version_id
        if kind == "Interpolate" and version == "opset11":
            replacement = _interpolate_v4(op)
        elif kind == "Pad" and version == "opset12":
            replacement = _pad_v1(op)
        else:
            continue
        if replacement is None:
            continue
        replacement.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(replacement.output(0))
        converted += 1
    model.validate_nodes_and_infer_types()
    return converted


def keep_float32(xml_path: str | Path) -> int:
    """Make the IR at ``xml_path`` keep float32 at OpenVINO's defaults, in place.

    Converts the ops the CPU plugin would replace (:func:`downgrade_replaced_ops`), then marks every
    layer "precise". Returns the number of layers marked.

    Raises:
        FileNotFoundError: ``xml_path`` does not exist.
        ValueError: the file is not an OpenVINO IR (no ``<net><layers>``).
    """
    path = Path(xml_path)
    if not path.is_file():
        msg = f"OpenVINO IR not found: {path}"
        raise FileNotFoundError(msg)
    tree = ET.parse(path)  # noqa: S314 - our own exporter's output
    if tree.getroot().tag != "net" or tree.getroot().find("layers") is None:
        msg = f"{path} is not an OpenVINO IR: expected <net><layers>, found <{tree.getroot().tag}>."
        raise ValueError(msg)
    import openvino as ov

    model = ov.Core().read_model(path)
    if downgrade_replaced_ops(model):
        # Written beside and then moved over: read_model maps the .bin, which must not change under it.
        staged = path.with_name(f".{path.stem}.staged.xml")
        ov.save_model(model, staged, compress_to_fp16=False)  # weights keep the precision they have
        del model
        staged.with_suffix(".bin").replace(path.with_suffix(".bin"))
        staged.replace(path)
        tree = ET.parse(path)  # noqa: S314 - the rewritten IR
    layers = tree.getroot().find("layers")
    marked = 0
    for layer in layers.iter("layer"):
        if layer.get("type") in {"Parameter", "Result", "Const"}:
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.Element("rt_info")
            layer.insert(0, rt_info)
        if not any(attribute.get("name") == PRECISE_ATTRIBUTE["name"] for attribute in rt_info.iter("attribute")):
            ET.SubElement(rt_info, "attribute", PRECISE_ATTRIBUTE)
            marked += 1
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return marked
