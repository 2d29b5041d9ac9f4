"""Small real photos (scikit-image samples, <= 96 px) and a broken file, as folders the CLI tests feed in."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_photos(folder: Path, count: int = 4) -> list[Path]:
    """`count` photos: RGB crops (one in a sub-folder, one JPEG), a grey one and an RGBA one."""
    from skimage import data

    astronaut, chelsea, coffee = data.astronaut(), data.chelsea(), data.coffee()
    alpha = np.linspace(0, 255, 40 * 40, dtype=np.float32).reshape(40, 40).round().astype(np.uint8)
    pictures = [
        ("astronaut.png", Image.fromarray(astronaut[24:88, 176:240])),
        ("sub/chelsea.jpg", Image.fromarray(chelsea[100:175, 150:240])),
        ("camera_grey.png", Image.fromarray(data.camera()[200:248, 200:248])),
        ("rgba.png", Image.fromarray(np.dstack([coffee[150:190, 250:290], alpha]), "RGBA")),
    ]
    for i in range(len(pictures), count):  # more distinct crops for longer runs
        pictures.append((f"coffee_{i}.png", Image.fromarray(coffee[i * 20:i * 20 + 96, i * 30:i * 30 + 96])))
    paths = []
    for name, im in pictures[:count]:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=95) if name.endswith(".jpg") else im.save(path)
        paths.append(path)
    return paths


def write_corrupt(folder: Path) -> list[Path]:
    """A file named .png that is not an image, and a truncated PNG."""
    garbage = folder / "corrupt.png"
    garbage.write_bytes(b"this is not an image" * 10)
    good = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    truncated = folder / "truncated.png"
    good.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    return [garbage, truncated]


def receipt_of(output: Path) -> dict:
    """The receipt written beside `output`, checked against docs/receipt.schema.json (the command line and
    Ray workers write it in other processes, where the suite-wide check does not reach)."""
    from receipt_schema import problems

    receipt = json.loads(output.with_suffix(".json").read_text())
    assert not problems(receipt), (output.name, problems(receipt)[:3])
    return receipt


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
