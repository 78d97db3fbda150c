"""Reading encoded images into the uint8 BGR arrays the detector takes, with errors that name the file.

Decoding goes through Pillow rather than ``cv2.imdecode`` because OpenCV silently returns a
partly grey image for a truncated JPEG, while Pillow raises; Pillow also reads every mode
(grey, palette, alpha, 16-bit, CMYK) and the EXIF orientation tag, so the pixels returned are
the image as a viewer displays it and every coordinate computed on them refers to that view.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .storage import StorageOptions, filesystem, redact

DEFAULT_MAX_PIXELS = 100_000_000

ERROR_KINDS = {
    "empty": "the object has 0 bytes",
    "not_image": "not a format the decoder knows (e.g. text named .jpg)",
    "truncated": "the image data ends early (a JPEG or PNG cut short)",
    "corrupt": "the header or the image data cannot be decoded",
    "too_large": "more pixels than max_pixels (from the header, before decoding) or more bytes than max_bytes",
    "not_found": "no object at the URI (e.g. a manifest entry whose object is absent)",
    "permission_denied": "the store refuses to serve it (S3 AccessDenied)",
    "unreadable": "any other failure of this one object (a folder, a name no store can open)",
    "storage": "the store failed to serve it (5xx, timeouts, resets, throttling) after every retry",
}
"""Every ``error_kind`` of an image that could not be decoded, and what it means. All but
``storage`` are permanent: the object itself is at fault."""

RETRYABLE_KINDS = frozenset({"storage"})
"""Error kinds that say nothing about the object: reading it again later may succeed."""

# Truncated files must fail, not be padded with grey (Pillow's default, made explicit here
# because other code in the same process may have flipped this global).
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An object that cannot be turned into an image; the message names it and says why.

    ``kind`` is a short machine-readable reason, one of :data:`ERROR_KINDS`: all permanent (the
    object itself is at fault) but ``storage`` (the store failed to serve it; a later attempt may
    succeed, see :data:`RETRYABLE_KINDS`).
    """

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        super().__init__(message)
        self.kind = kind


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError(f"{name}: empty object (0 bytes)", "empty")
    _set_pillow_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not an image (unrecognised format)", "not_image") from exc
    except Image.DecompressionBombError as exc:
        raise _bomb_error(name, exc, max_pixels) from exc
    except Exception as exc:
        raise ImageDecodeError(f"{name}: unreadable image header ({exc})", "corrupt") from exc


def _set_pillow_limit(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb check (an error above twice ``Image.MAX_IMAGE_PIXELS``,
    in ``Image.open`` and for GIF frames and TIFF tiles while decoding) to ``max_pixels`` where it
    is lower, so that ``max_pixels`` decides, above Pillow's default of 179 MP as below it (ours
    is checked from the header right after opening). Pillow's setting is process-wide, so it is
    only ever raised: a decoder with a lower limit in the same process is never refused by
    Pillow for an image within its own limit; the highest limit used is Pillow's backstop."""
    wanted = -(-max_pixels // 2)
    if Image.MAX_IMAGE_PIXELS is not None and wanted > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = wanted


def _bomb_error(name: str, exc: Exception, max_pixels: int) -> ImageDecodeError:
    """Pillow's decompression-bomb error, told with our limit."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found[1]) / 1e6:.1f} MP" if found else "its size"
    return ImageDecodeError(f"{name}: {size} exceeds the limit of {max_pixels / 1e6:g} MP", "too_large")


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{name}: {width}x{height} = {width * height / 1e6:.1f} MP exceeds the limit of {max_pixels / 1e6:g} MP",
            "too_large",
        )


def _to_rgb8(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is dropped (the colour under it is kept)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of rescaling them.
        wide = np.asarray(im, dtype=np.uint32 if im.mode == "I" else np.uint16)
        shift = 8 if im.mode != "I" or wide.max(initial=0) > 255 else 0
        im = Image.fromarray((wide >> shift).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded bytes to an H x W x 3 uint8 BGR array, EXIF orientation applied.

    H x W are the displayed size (after the EXIF rotation). Grey, alpha, palette, 16-bit and
    CMYK images are converted to 8-bit BGR. Images over ``max_pixels`` are refused from their
    header, before any pixel is allocated (decompression bombs). Zero-byte, non-image,
    truncated and corrupt data raise :class:`ImageDecodeError` naming ``name`` and the reason.
    """
    im = _open(data, name, max_pixels)
    with im:
        _check_pixels(*im.size, name, max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
        except Image.DecompressionBombError as exc:
            raise _bomb_error(name, exc, max_pixels) from exc
        except OSError as exc:
            kind = "truncated" if "truncated" in str(exc) else "corrupt"
            raise ImageDecodeError(f"{name}: {kind} image data ({exc})", kind) from exc
        except Exception as exc:
            raise ImageDecodeError(f"{name}: corrupt image data ({exc})", "corrupt") from exc
        # In place: the default returns a copy even when there is nothing to rotate. An unparsable
        # EXIF block leaves the stored orientation, like most viewers.
        with contextlib.suppress(Exception):
            ImageOps.exif_transpose(im, in_place=True)
        rgb = _to_rgb8(im)
        if rgb.width == 0 or rgb.height == 0:
            raise ImageDecodeError(f"{name}: empty image of size {rgb.width}x{rgb.height}", "corrupt")
        return _bgr_array(rgb)


def _bgr_array(rgb: Image.Image) -> np.ndarray:
    """8-bit RGB Pillow image -> H x W x 3 BGR array (writable, C-contiguous).

    ``np.asarray(image)`` plus a channel flip cost 5 ms for a 1024x768 photo, twice the time of
    decoding it. Pillow stores RGB as 4 bytes per pixel and exports that buffer without a copy
    through the Arrow C data interface, leaving one OpenCV pass to BGR (0.3 ms). Pillow exports
    only images held in one memory block (16 MiB by default, ~4 MP; ``PILLOW_BLOCK_SIZE``);
    larger ones go through its raw encoder, which writes BGR directly (+1.3 ms per 0.7 MP).
    """
    width, height = rgb.size
    try:
        rgbx = np.frombuffer(pa.array(rgb).buffers()[-1], np.uint8, width * height * 4)
    except ValueError:
        return np.frombuffer(bytearray(rgb.tobytes("raw", "BGR")), np.uint8).reshape(height, width, 3)
    return cv2.cvtColor(rgbx.reshape(height, width, 4), cv2.COLOR_RGBA2BGR)


def read_bytes(uri: str, storage: StorageOptions | None = None, max_bytes: int | None = None) -> bytes:
    """All bytes of the object at ``uri``, failures raised as :class:`ImageDecodeError` by kind.

    An object larger than ``max_bytes`` is ``too_large`` after one ranged read of
    ``max_bytes + 1`` bytes: it is never read whole. A missing or forbidden object is
    permanent (``not_found``, ``permission_denied``); any other failure of the store (5xx after
    the client's own retries, timeouts, resets, throttling) is ``storage``, which may pass.
    """
    try:
        fs, path = filesystem(uri, storage)
        data = fs.cat_file(path) if max_bytes is None else _read_head(fs, path, max_bytes + 1)
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{uri}: no such object", "not_found") from exc
    except PermissionError as exc:
        raise ImageDecodeError(f"{uri}: permission denied ({exc})", "permission_denied") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(f"{uri}: is a directory", "unreadable") from exc
    except Exception as exc:
        raise ImageDecodeError(f"{uri}: storage error ({type(exc).__name__}: {exc})", "storage") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError(f"{uri}: larger than the limit of {max_bytes:,} bytes", "too_large")
    return data


def _read_head(fs: fsspec.AbstractFileSystem, path: str, size: int) -> bytes:
    """The first ``size`` bytes of an object (all of a smaller one) in one ranged read."""
    try:
        return fs.cat_file(path, start=0, end=size)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except OSError:
        # An empty object has no byte range to serve (S3 answers 416).
        if fs.size(path) == 0:
            return b""
        raise


def read_image(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, storage: StorageOptions | None = None) -> np.ndarray:
    """Read and decode an image from a local path or any fsspec URI."""
    return decode_image(read_bytes(uri, storage), uri, max_pixels)


_EXIF_ORIENTATION = 0x0112
_JPEG_END = b"\xff\xd9"


@dataclass(frozen=True)
class JpegHeader:
    """What the host reads of a JPEG that the device decodes: its stored size and EXIF orientation (1-8)."""

    height: int
    width: int
    orientation: int


def probe_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> JpegHeader | None:
    """The header of ``data`` if the device should decode it, else None (the CPU decoder will,
    and raise what is wrong with it): a complete RGB or grey JPEG within ``max_pixels``."""
    if not data.rstrip(b"\0").endswith(_JPEG_END):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.width * im.height > max_pixels:
                    return None
                try:
                    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
                except Exception:
                    orientation = 1  # an unparsable EXIF block: the stored orientation, like most viewers
                return JpegHeader(im.height, im.width, orientation if 1 <= orientation <= 8 else 1)
    except Exception:
        return None


@dataclass
class FetchedImage:
    """One image after reading and decoding: pixels (H, W, 3) uint8 BGR, or why there are none.

    ``image`` is a numpy array from the CPU decoder or, once decoded on a device, a torch
    tensor there. A JPEG left to the device (``fetch_image(..., device_jpeg=True)``) has no
    pixels yet: ``encoded`` holds its bytes and ``header`` what :func:`probe_jpeg`
    read, until :func:`device_decode.decode_fetched` fills ``image`` (or the error fields).
    """

    uri: str
    image: Any
    error_kind: str | None
    error: str | None
    read_ms: float
    decode_ms: float
    encoded: bytes | None = None
    header: Any = None

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) as displayed, once known; None for an error row."""
        if self.image is not None:
            return int(self.image.shape[0]), int(self.image.shape[1])
        if self.header is not None:
            h, w = self.header.height, self.header.width
            return (w, h) if self.header.orientation >= 5 else (h, w)
        return None


def fetch_image(
    uri: str,
    storage: StorageOptions | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_bytes: int | None = None,
    attempts: int = 1,
    backoff: float = 1.0,
    device_jpeg: bool = False,
) -> FetchedImage:
    """Read and decode one object, timing both; every per-image failure is returned, never raised.

    A ``storage`` failure is tried again, up to ``attempts`` reads in all, after ``backoff``,
    2 x ``backoff``, ... seconds: a store's brownout of seconds must not become an error row.
    ``error_kind`` is an :class:`ImageDecodeError` kind, or ``unreadable`` for any other failure
    of this one object (a batch job must not lose its other images to it). With
    ``device_jpeg``, a JPEG the device can decode is only probed (see :class:`FetchedImage`).
    """
    start = time.perf_counter()
    read_done = None
    encoded = header = None
    image = None
    try:
        for attempt in range(attempts):
            try:
                data = read_bytes(uri, storage, max_bytes)
                break
            except ImageDecodeError as exc:
                if exc.kind not in RETRYABLE_KINDS or attempt + 1 == attempts:
                    raise
                time.sleep(backoff * 2**attempt)
        read_done = time.perf_counter()
        if device_jpeg:
            header = probe_jpeg(data, max_pixels)
        if header is not None:
            encoded = data
        else:
            image = decode_image(data, uri, max_pixels)
        error_kind = error = None
    except ImageDecodeError as exc:
        error_kind, error = exc.kind, redact(str(exc))
    except Exception as exc:
        error_kind, error = "unreadable", redact(f"{uri}: {type(exc).__name__}: {exc}")
    end = time.perf_counter()
    read_done = read_done or end
    return FetchedImage(uri, image, error_kind, error, (read_done - start) * 1e3, (end - read_done) * 1e3, encoded, header)
