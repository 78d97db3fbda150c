"""Decoding: every input mode becomes 8-bit BGR as displayed; every bad input a named error."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from retinaface_core.image_io import ImageDecodeError, decode_image, fetch_image, read_bytes, read_image

RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A 40 x 60 RGB test card: distinct corners so rotations and channel swaps show."""
    card = np.zeros((40, 60, 3), np.uint8)
    card[:20, :30] = (255, 0, 0)
    card[:20, 30:] = (0, 255, 0)
    card[20:, :30] = (0, 0, 255)
    card[20:, 30:] = (255, 255, 255)
    return card


def test_png_is_bgr(rgb):
    out = decode_image(encode(Image.fromarray(rgb), "PNG"), "card.png")
    np.testing.assert_array_equal(out, rgb[:, :, ::-1])
    assert out.dtype == np.uint8 and out.flags.c_contiguous


@pytest.mark.parametrize(
    "orientation, expected", [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))]
)
def test_exif_orientation_applied(rgb, orientation, expected):
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(Image.fromarray(rgb), "PNG", exif=exif), "rotated.png")
    np.testing.assert_array_equal(out, expected(rgb)[:, :, ::-1])


def test_grey_alpha_palette_cmyk_become_bgr(rgb):
    grey = decode_image(encode(Image.fromarray(rgb).convert("L"), "PNG"), "grey.png")
    assert grey.shape == (40, 60, 3) and (grey[..., 0] == grey[..., 2]).all()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgba), "PNG"), "a.png"), rgb[:, :, ::-1])
    palette = decode_image(encode(Image.fromarray(rgb).convert("P"), "PNG"), "p.png")
    assert palette.shape == (40, 60, 3)
    cmyk = decode_image(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), "cmyk.jpg")
    assert cmyk.shape == (40, 60, 3)
    assert np.abs(cmyk.astype(int) - rgb[:, :, ::-1]).mean() < 12


def test_16_bit_rescaled_not_clipped():
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(wide), "PNG"), "deep.png")
    np.testing.assert_array_equal(out[..., 0], (wide >> 8).astype(np.uint8))


def test_truncated_jpeg_is_an_error(shared_dir):
    data = (shared_dir / "images/crowd_baseball.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match="truncated") as err:
        decode_image(data[: len(data) // 2], "half.jpg")
    assert err.value.kind == "truncated" and "half.jpg" in str(err.value)


def test_empty_and_non_image_and_garbage():
    with pytest.raises(ImageDecodeError, match="0 bytes") as err:
        decode_image(b"", "zero.jpg")
    assert err.value.kind == "empty"
    with pytest.raises(ImageDecodeError, match="not an image") as err:
        decode_image(b"hello, I am text\n", "text.jpg")
    assert err.value.kind == "not_image"
    header = encode(Image.fromarray(RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")[:400]
    with pytest.raises(ImageDecodeError) as err:
        decode_image(header + bytes(RNG.integers(0, 255, 2000, dtype=np.uint8)), "garbage.jpg")
    assert err.value.kind in ("truncated", "corrupt")


def test_pixel_limit_checked_from_header():
    big = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageDecodeError, match="6.0 MP exceeds the limit of 5 MP") as err:
        decode_image(big, "big.png", max_pixels=5_000_000)
    assert err.value.kind == "too_large"


def test_read_errors_are_named(tmp_path):
    with pytest.raises(ImageDecodeError, match="no such object") as err:
        read_image(str(tmp_path / "missing.jpg"))
    assert err.value.kind == "not_found"

    class ForbiddenFS(MemoryFileSystem):
        """What s3fs raises for an AccessDenied object."""

        protocol = ("forbidden",)

        def cat_file(self, path, start=None, end=None, **kwargs):
            raise PermissionError(f"Access Denied: {path}")

    fsspec.register_implementation("forbidden", ForbiddenFS, clobber=True)
    with pytest.raises(ImageDecodeError, match="permission denied") as err:
        read_bytes("forbidden://secret.jpg")
    assert err.value.kind == "permission_denied"
    fetched = fetch_image("forbidden://secret.jpg")
    assert fetched.image is None and fetched.error_kind == "permission_denied" and "secret.jpg" in fetched.error


@pytest.mark.parametrize("size", [(60, 40), (2600, 1800)], ids=["one-block", "several-blocks"])
def test_both_pixel_export_paths_give_the_exact_pixels(size):
    # Pillow keeps images above 16 MiB (RGBX) in several memory blocks, which take another path.
    width, height = size
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(pixels), "PNG", compress_level=0), "noise.png")
    np.testing.assert_array_equal(out, pixels[:, :, ::-1])
    assert out.flags.writeable and out.flags.c_contiguous


def test_real_photo_matches_opencv(shared_dir):
    import cv2

    path = shared_dir / "images/crowd_selfie.jpg"
    ours = read_image(str(path))
    theirs = cv2.imread(str(path))
    assert ours.shape == theirs.shape
    # Both use libjpeg(-turbo); IDCT/upsampling settings may differ by a grey level or two.
    assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 2.0
