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
from PIL import Image, ImageDraw, ImageEnhance

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


VARIANTS = ("crop", "rescale", "squash", "jpeg", "phone")


def acquisition_variant(data: bytes, how: str, rng: np.random.Generator) -> bytes:
    """An honest re-take of an encoded image (JPEG out): `crop` a random 50-85% window,
    `rescale` to a 128 px shorter side, `squash` to 180x180 (aspect lost), `jpeg` re-encoded
    at quality 15-45, `phone` a phone camera's look (more saturated, another white balance and
    tone curve, sharpened)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    quality = int(rng.integers(70, 95))
    if how == "crop":
        side = rng.uniform(0.5, 0.85)
        w, h = max(1, int(width * side)), max(1, int(height * side))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = image.crop((x, y, x + w, y + h))
    elif how == "rescale":
        scale = 128 / min(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    elif how == "squash":
        image = image.resize((180, 180), Image.BICUBIC)
    elif how == "jpeg":
        quality = int(rng.integers(15, 45))
    elif how == "phone":
        image = ImageEnhance.Color(image).enhance(rng.uniform(1.15, 1.6))
        pixels = np.asarray(image, np.float32) * rng.uniform([0.9, 0.9, 0.8], [1.15, 1.05, 1.1])
        pixels = 255 * (np.clip(pixels, 0, 255) / 255) ** rng.uniform(0.75, 1.2)
        image = ImageEnhance.Sharpness(Image.fromarray(pixels.astype(np.uint8))).enhance(rng.uniform(1.0, 2.0))
    else:
        raise ValueError(f"unknown variant {how!r}; expected one of {', '.join(VARIANTS)}")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
