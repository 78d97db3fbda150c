"""Sample inputs that need no download: scikit-image's bundled photos, variants of them, broken files.

Used by the demo, the tests and the benchmark. Every function returns ``{relative name: encoded
bytes}``; names carry the extension a real bucket would have (some in upper case).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def encode(rgb: np.ndarray, fmt: str, exif_orientation: int | None = None, **kwargs) -> bytes:
    """Encode an (H, W[, C]) uint8/uint16 array with Pillow."""
    image = Image.fromarray(rgb)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = exif_orientation
        kwargs["exif"] = exif
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "camera": data.camera(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
    }


def generated_images() -> dict[str, bytes]:
    """Photos in every format and mode the job must read, plus crops, rescales and a rotation.

    ``astronaut_exif6.jpg`` stores ``astronaut_portrait.jpg`` (512 high, 400 wide) turned 90
    degrees counter-clockwise with EXIF orientation 6, so a viewer (and the job) shows her upright.
    """
    photos = _photos()
    astronaut = photos["astronaut"]
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 200, np.uint8)])
    wide = (astronaut.mean(axis=2) * 257).astype(np.uint16)
    portrait = np.ascontiguousarray(astronaut[:, 56:456])
    return {
        "photos/astronaut.jpg": encode(astronaut, "JPEG", quality=92),
        "photos/camera.png": encode(photos["camera"], "PNG"),
        "photos/chelsea.jpg": encode(photos["chelsea"], "JPEG", quality=90),
        "photos/coffee.webp": encode(photos["coffee"], "WEBP", quality=90),
        "variants/astronaut_portrait.jpg": encode(portrait, "JPEG", quality=95),
        "variants/astronaut_exif6.jpg": encode(np.ascontiguousarray(np.rot90(portrait, 1)), "JPEG", 6, quality=95),
        "variants/astronaut_grey.JPG": encode(np.asarray(Image.fromarray(astronaut).convert("L")), "JPEG", quality=92),
        "variants/astronaut_alpha.png": encode(rgba, "PNG"),
        "variants/astronaut_16bit.png": encode(wide, "PNG"),
        "variants/astronaut_face_crop.jpeg": encode(np.ascontiguousarray(astronaut[20:260, 120:330]), "JPEG", quality=92),
        "variants/astronaut_x2.bmp": encode(np.asarray(Image.fromarray(astronaut).resize((1024, 1024))), "BMP"),
        "variants/astronaut_half.jpg": encode(np.asarray(Image.fromarray(astronaut).resize((256, 256))), "JPEG", quality=90),
    }


def broken_files(reference_jpeg: bytes) -> dict[str, bytes]:
    """Objects that look like images by name but are not: each must become an error row."""
    return {
        "broken/empty.jpg": b"",
        "broken/truncated.jpg": reference_jpeg[: len(reference_jpeg) // 2],
        "broken/not_an_image.jpg": b"This is a text file, not a JPEG.\n",
        "broken/random_bytes.png": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    }


def oversized_png(width: int, height: int) -> bytes:
    """A flat grey PNG of ``width`` x ``height``: tiny to store, large to decode (a pixel bomb)."""
    return encode(np.full((height, width), 128, np.uint8), "PNG", optimize=False)


def shared_photos(shared_dir: Path) -> dict[str, bytes]:
    """The real photos of ``../shared`` (crowds and WIDER FACE val), when that folder exists."""
    files = sorted((shared_dir / "images").glob("*.jpg")) + sorted((shared_dir / "widerface/val/images").glob("*/*.jpg"))
    return {f"shared/{path.relative_to(shared_dir).as_posix()}": path.read_bytes() for path in files}


def random_variant(rgb: np.ndarray, rng: np.random.Generator, max_side: int = 1024) -> np.ndarray:
    """A random crop (at least half of each side) rescaled so its long side is 256..max_side."""
    height, width = rgb.shape[:2]
    h = int(rng.integers(height // 2, height + 1))
    w = int(rng.integers(width // 2, width + 1))
    y = int(rng.integers(0, height - h + 1))
    x = int(rng.integers(0, width - w + 1))
    crop = rgb[y : y + h, x : x + w]
    long_side = int(rng.integers(256, max_side + 1))
    factor = long_side / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
