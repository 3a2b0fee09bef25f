"""Export a trained FedDyMem checkpoint to OpenVINO and run it with anomalib's OpenVINOInferencer.

The exported IR gives torch's scores at OpenVINO's defaults (no precision hint needed).

Usage::

    python examples/export_openvino.py path/to/model.ckpt path/to/image.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine
from anomalib.visualization import visualize_image_item
from anomalib_feddymem import FedDyMem


def main(checkpoint: Path, image: Path) -> None:
    """Export, predict ``image`` and save anomalib's visualisation next to the IR."""
    model = FedDyMem.load_from_checkpoint(checkpoint, map_location="cpu")
    export_root = Path("results") / "export_openvino"
    xml = Engine().export(model, export_type=ExportType.OPENVINO, export_root=export_root)
    prediction = OpenVINOInferencer(path=xml, device="CPU").predict(image).items[0]
    print(f"{image.name}: score {float(prediction.pred_score):.3f}, anomalous: {bool(prediction.pred_label)}")
    picture = visualize_image_item(
        prediction, fields=["image", "anomaly_map"], overlay_fields=[("image", ["anomaly_map"])]
    )
    picture.save(export_root / f"{image.stem}_prediction.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
