"""Real images that are not dermoscopy, to measure the out-of-distribution gate with.

Photos that ship inside installed PyPI packages (nothing downloads): scikit-image's
sample images (a cat, an astronaut, coffee, coins, a rocket, a retina, histology, ...),
scikit-learn's two sample photos, matplotlib's, and faces of scikit-image's LFW subset;
plus rendered ones a clinic might upload by mistake: blank frames and pages of text.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


def _package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def _encoded(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def package_photos() -> Iterator[tuple[str, str, bytes]]:
    """(category, name, encoded image) for every sample photo of the installed packages."""
    folders = {
        "scikit-image": (_package_folder("skimage"), "data"),
        "scikit-learn": (_package_folder("sklearn"), "datasets/images"),
        "matplotlib": (_package_folder("matplotlib"), "mpl-data/sample_data"),
    }
    for package, (root, sub) in folders.items():
        if root is None:
            continue
        for path in sorted((root / sub).glob("*")):
            if path.suffix.lower() in PHOTO_SUFFIXES:
                yield package, path.name, path.read_bytes()
    root = _package_folder("skimage")
    if root is not None and (root / "data" / "lfw_subset.npy").exists():
        faces = np.load(root / "data" / "lfw_subset.npy")  # (200, 25, 25) grey faces in [0, 1]
        for i, face in enumerate(faces):
            image = Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((200, 200), Image.BICUBIC)
            yield "face (LFW)", f"lfw_subset[{i}]", _encoded(image)


def rendered_images() -> Iterator[tuple[str, str, bytes]]:
    """Blank frames (black, white, grey, two skin tones) and pages of text."""
    for colour in [(0, 0, 0), (255, 255, 255), (128, 128, 128), (224, 172, 105), (141, 85, 36)]:
        yield "blank frame", f"rgb{colour}", _encoded(Image.new("RGB", (600, 450), colour))
    for page in range(5):
        image = Image.new("RGB", (600, 800), "white")
        draw = ImageDraw.Draw(image)
        for line in range(30):
            draw.text((30, 30 + 24 * line), f"Referral letter {page}, line {line}: lesion on the left shoulder, 6 mm.", fill="black")
        yield "document", f"page{page}", _encoded(image)


def non_dermoscopic_images() -> list[tuple[str, str, bytes]]:
    return [*package_photos(), *rendered_images()]
