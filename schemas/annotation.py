"""Arrow schema of the annotation job's output: one row per input image, its faces nested.

One nested table rather than an images table and a faces table, so that a shard's whole result
is a single Parquet object: writing it is the shard's atomic commit (see ``docs/annotate.md``).
The ``shard`` column is not stored in the files; it comes from the hive partition directory
(``annotations/shard=<id>/part-<fingerprint>.parquet``), which is what lets readers prune by shard.

Conventions: coordinates are float32 pixels of the image as displayed (EXIF orientation
applied), x to the right, y down; landmarks are left eye, right eye, nose, left mouth corner,
right mouth corner, left/right as seen in the image. Angles are degrees, times milliseconds.

Rows and values:

- ``uri``: one row per image object of the input. Local names that are not valid UTF-8 are
  percent-encoded ``file://`` URIs (``file:///photos/caf%E9.jpg``: RFC 8089, decode with
  ``urllib.parse.unquote_to_bytes``); every other local name is its plain absolute path, every
  object-store name its ``s3://bucket/key`` as written (``?``, ``#``, ``%`` and spaces included).
- ``status`` is one of :data:`STATUS_VALUES`: ``ok`` (decoded and detected: ``width``,
  ``height``, ``num_faces`` and ``faces`` set, ``num_faces`` 0 and ``faces`` empty when the image
  has no face) or ``error`` (``error_kind`` and ``error`` set; ``width``, ``height``,
  ``num_faces`` and ``faces`` null: nothing was detected).
- ``error_kind`` is one of ``retinaface_core.image_io.ERROR_KINDS``: ``empty``, ``not_image``,
  ``truncated``, ``corrupt``, ``too_large``, ``not_found``, ``permission_denied``,
  ``unreadable`` (permanent: the object is at fault) and ``storage`` (the store failed to serve
  it; the next run retries it). ``error`` is a message naming the object and the reason.
- ``faces`` of an image are ordered by descending ``score``, ``face_index`` numbering them from 0.
- Quality columns (:data:`QUALITY_COLUMNS`, ``retinaface_core/quality.py``, table in
  ``docs/annotate.md``): ``face_size`` short side of the box (px); ``sharpness`` in [0, 1], 0
  for blur, independent of face size; ``yaw``, ``pitch``, ``roll`` degrees (> 0: nose right of
  the midline as seen, head up, eye line tilted clockwise as seen); ``brightness`` and
  ``contrast`` mean and standard deviation of the grey box in [0, 1]; ``exposure`` 1 - the
  fraction of clipped pixels of the box (all channels <= 8 or any >= 247), in [0, 1];
  ``quality`` in [0, 1], the fitted probability that a labeller marks the face with no heavy
  blur or occlusion, a typical pose and normal illumination.
- Integer columns (``width``, ``height``, ``num_faces``) read as pandas' nullable ``Int32``
  (the files carry pandas metadata), not as floats.

Each file's Parquet key-value metadata holds the settings it was made with, so that the
dataset describes itself without ``_dataset.json``: the JSON of all of them under
:data:`SETTINGS_METADATA_KEY`, and each under ``retinaface.<name>`` (:func:`file_metadata`:
``score_threshold``, ``nms_iou``, ``scale``, ``tta``, ``model_sha256``, ...), which duckdb shows
with ``parquet_kv_metadata``.

Bump ``SCHEMA_VERSION`` on any change; the job refuses to resume into an output written with
another version.

Versions:

1. First version.
2. Face column ``exposure`` (1 - fraction of clipped pixels) added before ``quality``;
   ``sharpness`` is now in [0, 1] and independent of face size, and ``quality`` is the fitted
   composite of ``retinaface_core/quality_model.json`` (issue 14). Values of the same name
   mean something else than in version 1, so the two must not share an output. Image column
   ``tta`` (the test-time augmentation the faces were found with) after ``input_scale``.
3. ``num_faces`` and ``faces`` are null on error rows (were 0 and empty); the files carry
   pandas metadata (integer columns read as ``Int32``) and each setting as its own key-value.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

SCHEMA_VERSION = 3
SETTINGS_METADATA_KEY = b"retinaface.annotation.settings"
"""Parquet metadata key of each shard file: the JSON of the settings it was made with (schema
version, model, detector settings, limits), as in ``_dataset.json``: every shard describes itself."""
SETTING_KEY_PREFIX = "retinaface."
"""Prefix of the Parquet metadata key of each single setting (``retinaface.score_threshold``)."""

STATUS_VALUES = ("ok", "error")

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
        pa.field("status", pa.string(), nullable=False),  # STATUS_VALUES
        pa.field("error_kind", pa.string()),  # ImageDecodeError.kind, null when ok
        pa.field("error", pa.string()),  # message naming the object and the reason
        pa.field("width", pa.int32()),  # displayed size; null when not decodable
        pa.field("height", pa.int32()),
        pa.field("num_faces", pa.int32()),  # null when status is error
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
        pa.field("faces", pa.list_(pa.field("item", FACE_STRUCT, nullable=False))),  # descending score; null when status is error
    ],
)

INTEGER_COLUMNS = ("width", "height", "num_faces")
"""Nullable integer columns, which pandas would read as float64 without the files' pandas metadata."""


def file_metadata(settings: dict[str, Any]) -> dict[bytes, bytes]:
    """The Parquet key-value metadata of a shard file made with ``settings`` (see the module
    docstring): the settings as one JSON and one key each, and pandas metadata that makes the
    integer columns ``Int32``."""
    pandas = {
        "index_columns": [],
        "column_indexes": [],
        "columns": [{"name": c, "field_name": c, "pandas_type": "int32", "numpy_type": "Int32", "metadata": None} for c in INTEGER_COLUMNS],
    }
    return {
        SETTINGS_METADATA_KEY: json.dumps(settings, sort_keys=True, default=str).encode(),
        **{f"{SETTING_KEY_PREFIX}{k}".encode(): json.dumps(v, default=str).encode() for k, v in sorted(settings.items())},
        b"pandas": json.dumps(pandas).encode(),
    }


# What a reader sees: the stored columns plus the hive partition column.
PARTITION_SCHEMA = pa.schema([pa.field("shard", pa.string())])


def partitioning() -> pads.Partitioning:
    """How pyarrow and pandas readers must read ``shard=<id>`` folders: as strings, never as the
    integers an all-digit shard id would otherwise be inferred as."""
    return pads.partitioning(PARTITION_SCHEMA, flavor="hive")
