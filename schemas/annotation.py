"""Arrow schema of the annotation job's output: one row per input image, its faces nested.

One nested table rather than an images table and a faces table, so that a shard's whole result
is a single Parquet object: writing it is the shard's atomic commit (see ``docs/annotate.md``).
The ``shard`` column is not stored in the files; it comes from the hive partition directory
(``annotations/shard=<id>/part-<fingerprint>.parquet``), which is what lets readers prune by shard.

Conventions: coordinates are float32 pixels of the image as displayed (EXIF orientation
applied), x to the right, y down; landmarks are left eye, right eye, nose, left mouth corner,
right mouth corner, left/right as seen in the image. Angles are degrees, times milliseconds.

Bump ``SCHEMA_VERSION`` on any change; the job refuses to resume into an output written with
another version.

Versions:

1. First version.
2. Face column ``exposure`` (1 - fraction of clipped pixels) added before ``quality``;
   ``sharpness`` is now in [0, 1] and independent of face size, and ``quality`` is the fitted
   composite of ``retinaface_core/quality_model.json`` (issue 14). Values of the same name
   mean something else than in version 1, so the two must not share an output. Image column
   ``tta`` (the test-time augmentation the faces were found with) after ``input_scale``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

SCHEMA_VERSION = 2
SETTINGS_METADATA_KEY = b"retinaface.annotation.settings"
"""Parquet metadata key of each shard file: the JSON of the settings it was made with (schema
version, model, detector settings, limits), as in ``_dataset.json``: every shard describes itself."""

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

QUALITY_COLUMNS = ("face_size", "sharpness", "yaw", "pitch", "roll", "brightness", "contrast", "exposure", "quality")

FACE_STRUCT = pa.struct(
    [pa.field("face_index", pa.int32(), nullable=False)]
    + [pa.field(c, pa.float32(), nullable=False) for c in ("x1", "y1", "x2", "y2", "score")]
    + [pa.field(f"{name}_{axis}", pa.float32(), nullable=False) for name in LANDMARK_NAMES for axis in "xy"]
    + [pa.field(c, pa.float32(), nullable=False) for c in QUALITY_COLUMNS]
)

ANNOTATION_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field("error_kind", pa.string()),  # ImageDecodeError.kind, null when ok
        pa.field("error", pa.string()),  # message naming the object and the reason
        pa.field("width", pa.int32()),  # displayed size; null when not decodable
        pa.field("height", pa.int32()),
        pa.field("num_faces", pa.int32(), nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),  # model registry version (--model), null for --weights
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("input_scale", pa.string(), nullable=False),
        pa.field("tta", pa.string(), nullable=False),  # test-time augmentation, "none" for one pass
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("read_ms", pa.float32(), nullable=False),
        pa.field("decode_ms", pa.float32(), nullable=False),
        pa.field("detect_ms", pa.float32(), nullable=False),  # the image's share of its batch
        pa.field("quality_ms", pa.float32(), nullable=False),
        pa.field("faces", pa.list_(pa.field("item", FACE_STRUCT, nullable=False)), nullable=False),
    ],
)

# What a reader sees: the stored columns plus the hive partition column.
PARTITION_SCHEMA = pa.schema([pa.field("shard", pa.string())])


def partitioning() -> pads.Partitioning:
    """How pyarrow and pandas readers must read ``shard=<id>`` folders: as strings, never as the
    integers an all-digit shard id would otherwise be inferred as."""
    return pads.partitioning(PARTITION_SCHEMA, flavor="hive")
