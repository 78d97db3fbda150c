"""A contact sheet of an annotation output: N faces sorted by quality, their scores, and a histogram.

    python -m jobs.annotate.report OUTPUT [--faces 60] [--pick spread] [--out contact_sheet.png]

One PNG: a grid of face tiles, best quality first, each with its quality score under it, then
a histogram of the quality scores of every face in the output, the shown ones marked. Faces
come from the committed shards only. A face's tile is its aligned crop from the crops table
(``--crops``) when it has one, else a square around its box cut from its source image.
``--pick spread`` (default) shows faces evenly spread over the quality ranking, so the sheet
shows what each score looks like; ``top`` and ``bottom`` the best and the worst.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

TILE = 112
"""Side (px) of a face tile; crops of another size are resized to it."""
CAPTION = 18
GAP = 6
MARGIN = 10
COLUMNS = 10
TITLE = 28
HISTOGRAM_HEIGHT = 170
HISTOGRAM_BINS = 20
BACKGROUND = 255
BOX_CONTEXT = 1.4
"""A tile cut by box is a square this many times the box's long side, centred on the box."""
PICKS = ("spread", "top", "bottom")


def pick_faces(quality: np.ndarray, count: int, pick: str) -> np.ndarray:
    """Indices of ``count`` of the faces (all of them if fewer), by descending quality.

    ``spread``: evenly spaced ranks from the best to the worst; ``top``/``bottom``: the best or
    the worst ``count``."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    order = np.argsort(-quality, kind="stable")
    if count >= len(order):
        return order
    if pick == "top":
        return order[:count]
    if pick == "bottom":
        return order[-count:]
    return order[np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))]


def tile_origins(count: int) -> list[tuple[int, int]]:
    """Top-left (x, y) of each of ``count`` tiles on the sheet, row by row."""
    return [(MARGIN + (k % COLUMNS) * (TILE + GAP), MARGIN + TITLE + (k // COLUMNS) * (TILE + CAPTION + GAP)) for k in range(count)]


def box_tile(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """A TILE x TILE square around a box (x1, y1, x2, y2) of an H x W x 3 image, black outside it."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = BOX_CONTEXT * max(x2 - x1, y2 - y1, 1.0)
    scale = TILE / side
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    matrix = np.array([[scale, 0, TILE / 2 - scale * cx - 0.5], [0, scale, TILE / 2 - scale * cy - 0.5]])
    return cv2.warpAffine(image, matrix, (TILE, TILE), flags=cv2.INTER_LINEAR)


def contact_sheet(tiles: Sequence[np.ndarray], captions: Sequence[str], quality: np.ndarray, shown: np.ndarray, title: str) -> np.ndarray:
    """The sheet (H, W, 3) uint8 BGR: ``tiles`` (TILE x TILE x 3 each) with ``captions`` under
    them, ``title`` above, and the histogram of ``quality`` (every face's) with the ``shown``
    faces' scores marked below."""
    columns = min(COLUMNS, max(len(tiles), 1))
    rows = math.ceil(len(tiles) / COLUMNS)
    width = max(2 * MARGIN + columns * (TILE + GAP) - GAP, 480)
    grid_height = rows * (TILE + CAPTION + GAP)
    sheet = np.full((MARGIN + TITLE + grid_height + HISTOGRAM_HEIGHT + MARGIN, width, 3), BACKGROUND, np.uint8)
    _text(sheet, title, (MARGIN, MARGIN + 16), 0.5)
    for (x, y), tile, caption in zip(tile_origins(len(tiles)), tiles, captions):
        sheet[y : y + TILE, x : x + TILE] = tile if tile.shape[:2] == (TILE, TILE) else cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_AREA)
        _text(sheet, caption, (x + 2, y + TILE + 13), 0.42)
    top = MARGIN + TITLE + grid_height
    sheet[top:top + HISTOGRAM_HEIGHT, MARGIN:width - MARGIN] = quality_histogram(quality, shown, width - 2 * MARGIN, HISTOGRAM_HEIGHT)
    return sheet


def quality_histogram(quality: np.ndarray, shown: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (height, width, 3) panel: bars of the quality scores in HISTOGRAM_BINS bins over [0, 1],
    each shown face's score as a tick under the axis, the axis labelled."""
    panel = np.full((height, width, 3), BACKGROUND, np.uint8)
    counts, _ = np.histogram(np.clip(quality, 0, 1), bins=HISTOGRAM_BINS, range=(0, 1))
    left, right, top, bottom = 34, width - 8, 22, height - 34
    _text(panel, f"quality of all {len(quality)} faces (ticks: the faces shown)", (left, 14), 0.42)
    peak = max(int(counts.max(initial=0)), 1)
    step = (right - left) / HISTOGRAM_BINS
    for k, count in enumerate(counts):
        bar = round((bottom - top) * count / peak)
        cv2.rectangle(panel, (round(left + k * step) + 1, bottom - bar), (round(left + (k + 1) * step) - 1, bottom), (170, 120, 60), -1)
    cv2.line(panel, (left, bottom), (right, bottom), (0, 0, 0), 1)
    for value in np.clip(shown, 0, 1):
        x = round(left + value * (right - left))
        cv2.line(panel, (x, bottom + 2), (x, bottom + 8), (40, 40, 200), 1)
    for value in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = round(left + value * (right - left))
        _text(panel, f"{value:g}", (x - 8, bottom + 24), 0.4)
    _text(panel, str(peak), (2, top + 8), 0.4)
    _text(panel, "0", (2, bottom), 0.4)
    return panel


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
