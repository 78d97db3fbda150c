"""A contact sheet of an annotation output: N faces sorted by quality, their scores, and a histogram.

    python -m jobs.annotate.report OUTPUT [--faces 60] [--pick spread] [--out contact_sheet.png] [--s3-...]

One PNG: a grid of face tiles, best quality first, each with its quality score under it
(marked ``(box)`` when cut by box), then a histogram of the quality scores of every face in the
output, the shown ones marked. Faces come from the committed shards only. A face's tile is its aligned crop from the crops table
(``--crops``) when it has one, else a square around its box cut from its source image.
``--pick spread`` (default) shows faces evenly spread over the quality ranking, so the sheet
shows what each score looks like; ``top`` and ``bottom`` the best and the worst.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from retinaface_core.image_io import ImageDecodeError, read_image
from retinaface_core.storage import StorageOptions, redact, write_file

from .._config import parse_config
from .._exit import ExitCode, JobError
from .output import OutputListing, OutputStore, arrow_filesystem

TILE = 112
"""Side (px) of a face tile; crops of another size are resized to it."""
CAPTION = 18
GAP = 6
MARGIN = 10
COLUMNS = 10
TITLE = 28
HISTOGRAM_HEIGHT = 170
HISTOGRAM_BINS = 20
MIN_WIDTH = 600
BACKGROUND = 255
BOX_CONTEXT = 1.4
"""A tile cut by box is a square this many times the box's long side, centred on the box."""
PICKS = ("spread", "top", "bottom")
FACE_COLUMNS = ("face_index", "x1", "y1", "x2", "y2", "quality")


@dataclass
class ReportConfig:
    """Draw a contact sheet of an annotation output: faces sorted by quality, and a histogram of the scores."""

    output: str = field(metadata={"help": "the annotation job's output (its --output)", "positional": True})
    faces: int = field(default=60, metadata={"help": "faces on the sheet (all of them if the output has fewer)"})
    pick: str = field(
        default="spread",
        metadata={"help": "which faces: spread (evenly over the quality ranking), top or bottom", "choices": list(PICKS)},
    )
    out: str = field(default="contact_sheet.png", metadata={"help": "where the PNG is written (local path or URI)"})
    s3: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` drew: where, how many faces of how many, how many from crops."""

    path: str
    shown: int
    faces: int
    from_crops: int


def write_report(config: ReportConfig) -> Report:
    """Draw the contact sheet of ``config.output``'s committed shards and write it to ``config.out``.

    Raises :class:`JobError` when the output holds no committed shard or no face, or ``--faces`` < 1.
    """
    if config.faces < 1:
        raise JobError(f"--faces must be >= 1, got {config.faces}")
    store = OutputStore(config.output, config.s3)
    listing = store.listing()
    if not listing.committed:
        raise JobError(f"{config.output}: no committed shard of annotations found")
    faces = committed_faces(store, listing)
    if not len(faces):
        raise JobError(f"{config.output}: the committed shards hold no face")
    quality = faces.column("quality").to_numpy()
    chosen = faces.take(pa.array(pick_faces(quality, config.faces, config.pick)))
    tiles, aligned = face_tiles(store, listing, chosen, config.s3)
    captions = [f"q {q:.3f}" + ("" if crop else " (box)") for q, crop in zip(chosen.column("quality").to_pylist(), aligned)]
    from_crops = sum(aligned)
    title = f"{len(chosen)} of {len(faces)} faces by quality ({config.pick}); {from_crops} aligned crops"
    sheet = contact_sheet(tiles, captions, quality, chosen.column("quality").to_numpy(), title)
    ok, png = cv2.imencode(".png", sheet)
    if not ok:
        raise JobError(f"could not encode the {sheet.shape} sheet as PNG")
    write_file(config.out, png.tobytes(), config.s3)
    return Report(config.out, len(chosen), len(faces), from_crops)


def committed_faces(store: OutputStore, listing: OutputListing) -> pa.Table:
    """Every face of the committed shards: ``uri``, ``run_id`` and the ``FACE_COLUMNS``."""
    dataset = pads.dataset(
        [store.shard_path(shard, fp) for shard, fp in sorted(listing.committed.items())],
        filesystem=arrow_filesystem(store.fs),
        format="parquet",
    )
    parts = []
    for batch in dataset.to_batches(columns=["uri", "run_id", "faces"]):
        faces, parents = pc.list_flatten(batch.column("faces")), pc.list_parent_indices(batch.column("faces"))
        columns = {"uri": batch.column("uri").take(parents), "run_id": batch.column("run_id").take(parents)}
        columns.update({name: faces.field(name) for name in FACE_COLUMNS})
        parts.append(pa.table(columns))
    return pa.concat_tables(parts) if parts else pa.table({})


def face_tiles(store: OutputStore, listing: OutputListing, faces: pa.Table, storage: StorageOptions) -> tuple[list[np.ndarray], list[bool]]:
    """A tile per face: its aligned crop from the committed crops objects where it has one (the
    crops object of a committed shard, the same run's), else cut by box from its source image.
    Returns the tiles and whether each is an aligned crop."""
    crops: dict[tuple[str, str, int], bytes] = {}
    paths = store.committed_crops(listing)
    if paths and len(faces):
        dataset = pads.dataset(sorted(paths.values()), filesystem=arrow_filesystem(store.fs), format="parquet")
        wanted = pc.field("uri").isin(faces.column("uri").unique())
        found = dataset.to_table(columns=["uri", "run_id", "face_index", "crop"], filter=wanted)
        keys = zip(*(found.column(c).to_pylist() for c in ("uri", "run_id", "face_index")))
        crops = dict(zip(keys, found.column("crop").to_pylist()))
    images: dict[str, np.ndarray | None] = {}
    tiles: list[np.ndarray] = []
    aligned: list[bool] = []
    for face in faces.to_pylist():
        crop = crops.get((face["uri"], face["run_id"], face["face_index"]))
        aligned.append(crop is not None)
        if crop is not None:
            tile = cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR)
            tiles.append(np.full((TILE, TILE, 3), 200, np.uint8) if tile is None else tile)
            continue
        if face["uri"] not in images:
            try:
                images[face["uri"]] = read_image(face["uri"], storage=storage)
            except ImageDecodeError:
                images[face["uri"]] = None  # gone or changed since it was annotated: a blank tile
        image = images[face["uri"]]
        box = [face[c] for c in ("x1", "y1", "x2", "y2")]
        tiles.append(np.full((TILE, TILE, 3), 200, np.uint8) if image is None else box_tile(image, box))
    return tiles, aligned


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
    width = max(2 * MARGIN + columns * (TILE + GAP) - GAP, MIN_WIDTH)
    grid_height = rows * (TILE + CAPTION + GAP)
    sheet = np.full((MARGIN + TITLE + grid_height + HISTOGRAM_HEIGHT + MARGIN, width, 3), BACKGROUND, np.uint8)
    _text(sheet, title, (MARGIN, MARGIN + 16), 0.5)
    for (x, y), tile, caption in zip(tile_origins(len(tiles)), tiles, captions):
        if tile.shape[:2] != (TILE, TILE):
            tile = cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_AREA)
        sheet[y : y + TILE, x : x + TILE] = tile
        _text(sheet, caption, (x + 2, y + TILE + 13), 0.42)
    top = MARGIN + TITLE + grid_height
    sheet[top : top + HISTOGRAM_HEIGHT, MARGIN : width - MARGIN] = quality_histogram(quality, shown, width - 2 * MARGIN, HISTOGRAM_HEIGHT)
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


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(ReportConfig, argv, prog="python -m jobs.annotate.report")
    try:
        report = write_report(config)
    except JobError as exc:
        print(f"report: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    print(f"report: {report.shown} of {report.faces} faces ({report.from_crops} from crops) drawn to {report.path}", flush=True)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
