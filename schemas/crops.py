"""Arrow schema of the annotation job's aligned face crops (``--crops SIZE``): one row per face crop.

One object per shard, ``crops/shard=<id>/part-<fingerprint>.parquet``, written just before the
shard's annotation object (the shard's commit, ``schemas.annotation``). A crop belongs to the
output only when the committed annotations hold its face from the same run: readers join on
(``shard``, ``uri``, ``run_id``, ``face_index``), which hides a crops object whose shard never
committed (an attempt that died between the two writes) and a redone shard's new crops until
its new rows commit (see ``docs/annotate.md``). ``shard`` comes from the hive partition
directory, as for the annotations.

Conventions: ``matrix`` is the 2 x 3 similarity transform, row-major, from image pixels (the
image as displayed, EXIF orientation applied; pixel centres at integer coordinates, OpenCV's
convention) to crop pixels: ``cv2.warpAffine(image, matrix.reshape(2, 3), (size, size))``
reproduces the crop. ``residual`` is the RMS distance (crop pixels) between the face's five
landmarks mapped by ``matrix`` and the ArcFace template scaled to ``size``: small for frontal
faces, growing with the head's yaw. ``crop`` is the encoded image (``format``), BGR once
decoded with ``cv2.imdecode``.

Bump ``CROPS_SCHEMA_VERSION`` on any change; it is part of the output's settings, so the job
refuses to resume into an output whose crops were written with another version.

Versions:

1. First version.
"""

from __future__ import annotations

import pyarrow as pa

CROPS_SCHEMA_VERSION = 1

CROPS_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("face_index", pa.int32(), nullable=False),  # the face's face_index in the annotations
        pa.field("run_id", pa.string(), nullable=False),  # the run of the rows these crops go with
        pa.field("size", pa.int32(), nullable=False),  # crop side, px
        pa.field("format", pa.string(), nullable=False),  # "jpeg" or "png"
        pa.field("matrix", pa.list_(pa.field("item", pa.float32(), nullable=False), 6), nullable=False),
        pa.field("residual", pa.float32(), nullable=False),
        pa.field("crop", pa.binary(), nullable=False),
    ],
)
