"""JPEG decoding on the GPU (nvJPEG through torchvision), a batch at a time, with the CPU decoder
as the fallback for everything the device cannot or must not decode.

The host's share of a JPEG is reading its header (:func:`image_io.probe_jpeg`): format, size, colour
mode, EXIF orientation and whether the data ends where a JPEG ends. Only baseline-decodable
RGB or grey JPEGs that are complete and within the pixel limit go to the device; truncated
files, CMYK, PNG, WebP, GIF, TIFF and the rest take :func:`image_io.decode_image`, so an
object gets the same pixels' meaning and the same error row whichever path it takes. Decoded
images are (H, W, 3) uint8 BGR tensors on the device with the EXIF orientation applied, as the
CPU decoder's arrays are.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from .image_io import DEFAULT_MAX_PIXELS, FetchedImage, ImageDecodeError, JpegHeader, decode_image
from .storage import redact


@functools.cache
def device_decoder_available() -> bool:
    """Whether torchvision's nvJPEG decoder can be used in this process."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def orient(image: Tensor, orientation: int) -> Tensor:
    """(H, W, C) image as stored -> as displayed for EXIF ``orientation`` (Pillow's
    ``ImageOps.exif_transpose``): 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
    clockwise, 7 transverse, 8 rotate 90 counter-clockwise. A view where possible."""
    if orientation == 2:
        return image.flip(1)
    if orientation == 3:
        return image.flip(0).flip(1)
    if orientation == 4:
        return image.flip(0)
    if orientation == 5:
        return image.transpose(0, 1)
    if orientation == 6:
        return image.transpose(0, 1).flip(1)
    if orientation == 7:
        return image.transpose(0, 1).flip(0).flip(1)
    if orientation == 8:
        return image.transpose(0, 1).flip(0)
    return image


def decode_jpegs(
    datas: list[bytes], headers: list[JpegHeader], names: list[str], device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Tensor | ImageDecodeError]:
    """Decode JPEGs that :func:`probe_jpeg` passed, in one batch on ``device``.

    Returns per image an (H, W, 3) uint8 BGR tensor on ``device``, orientation applied, or the
    :class:`ImageDecodeError` that the CPU decoder raised for an image the device could not
    decode (the batch is retried image by image first, so one bad file costs only itself).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded: list[Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded = [_decode_one(e, device) for e in encoded]
    results: list[Tensor | ImageDecodeError] = []
    for data, header, name, rgb in zip(datas, headers, names, decoded):
        if rgb is None or tuple(rgb.shape[1:]) != (header.height, header.width):
            results.append(_on_cpu(data, name, device, max_pixels))
        else:
            results.append(orient(rgb.permute(1, 2, 0).flip(-1), header.orientation))
    return results


def _decode_one(encoded: Tensor, device: torch.device) -> Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _on_cpu(data: bytes, name: str, device: torch.device, max_pixels: int) -> Tensor | ImageDecodeError:
    try:
        return torch.from_numpy(decode_image(data, name, max_pixels)).to(device)
    except ImageDecodeError as exc:
        return exc


def decode_fetched(items: Sequence[FetchedImage], device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Decode, in place and in one batch on ``device``, the images of ``items`` left to it by
    ``fetch_image(..., device_jpeg=True)``; each one's ``decode_ms`` gets an equal share of the
    batch's time. Items already decoded or failed are left as they are."""
    waiting = [item for item in items if item.encoded is not None]
    if not waiting:
        return
    start = time.perf_counter()
    datas = [item.encoded for item in waiting if item.encoded is not None]
    decoded = decode_jpegs(datas, [item.header for item in waiting], [item.uri for item in waiting], device, max_pixels)
    share = (time.perf_counter() - start) * 1e3 / len(waiting)
    for item, result in zip(waiting, decoded):
        if isinstance(result, ImageDecodeError):
            item.error_kind, item.error = result.kind, redact(str(result))
        else:
            item.image = result
        item.encoded = None
        item.decode_ms += share
