"""Build examples/data/effnet_images.npz (and provenance.json) from a directory of images.

Not run by the tests or the examples: it documents how the bundled arrays were made, so they
can be rebuilt or extended. Needs Pillow (``pip install qcompiler[image]``).

    python examples/data/make_data.py /path/to/images          # has calib/, eval/, provenance.json

Each image: RGB, shorter side resized to 256 (bilinear), center crop 224x224, stored as uint8
HWC. The examples turn these into the model's input in numpy (x/255, (x-0.5)/0.5, NCHW).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
RESIZE = 256
CROP = 224
COUNTS = {"calib": 32, "eval": 48}


def preprocess(path: Path) -> np.ndarray:
    """RGB, shorter side -> 256 (bilinear), center crop 224: uint8 [224, 224, 3]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = RESIZE / min(w, h)
        size = (max(RESIZE, round(w * scale)), max(RESIZE, round(h * scale)))
        im = im.resize(size, Image.BILINEAR)
        left = (size[0] - CROP) // 2
        top = (size[1] - CROP) // 2
        im = im.crop((left, top, left + CROP, top + CROP))
        arr = np.asarray(im, dtype=np.uint8)
    assert arr.shape == (CROP, CROP, 3), (path, arr.shape)
    return arr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="directory with calib/, eval/ and provenance.json")
    ap.add_argument("--out", type=Path, default=HERE, help="where to write effnet_images.npz and provenance.json")
    args = ap.parse_args()

    provenance = json.loads((args.source / "provenance.json").read_text())
    arrays: dict[str, np.ndarray] = {}
    kept: dict[str, list[dict[str, str]]] = {}
    for split, count in COUNTS.items():
        files = sorted((args.source / split).iterdir())[:count]
        if len(files) < count:
            raise SystemExit(f"{args.source / split}: need {count} images, found {len(files)}")
        arrays[split] = np.stack([preprocess(f) for f in files])
        by_file = {e["file"]: e for e in provenance[split]}
        kept[split] = [dict(by_file[f"{split}/{f.name}"], index=i) for i, f in enumerate(files)]
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "effnet_images.npz", **arrays)
    (args.out / "provenance.json").write_text(json.dumps(kept, indent=1) + "\n")
    for split, arr in arrays.items():
        print(f"{split}: {arr.shape} {arr.dtype}")


if __name__ == "__main__":
    main()
