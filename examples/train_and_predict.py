"""Train FedDyMem on one MVTec-layout folder with anomalib's Engine, then predict one image.

Usage::

    python examples/train_and_predict.py ../shared/data/mvtec_bottle
"""

from __future__ import annotations

import sys
from pathlib import Path

from anomalib.data import Folder
from anomalib.engine import Engine
from anomalib_feddymem import FedDyMem


def main(root: Path) -> None:
    """Fit on ``root/train/good``, report the test metrics and predict the first defective image."""
    defects = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    datamodule = Folder(name=root.name, root=root, normal_dir="train/good", normal_test_dir="test/good",
                        abnormal_dir=[f"test/{d}" for d in defects], num_workers=0)  # fmt: skip
    model = FedDyMem()  # the defaults: offline EfficientNet-Lite0 weights, 256 px
    engine = Engine(default_root_dir=Path("results") / "train_and_predict", logger=False)
    engine.fit(model, datamodule=datamodule)
    engine.test(model, datamodule=datamodule)
    image = sorted((root / "test" / defects[0]).iterdir())[0]
    (prediction,) = engine.predict(model, data_path=image, return_predictions=True)
    print(f"{image.name}: score {float(prediction.pred_score):.3f}, anomalous: {bool(prediction.pred_label)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
