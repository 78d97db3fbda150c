"""What runs on the Ray workers of the annotation job: read and decode, detect, score, commit a shard.

A shard is the unit of work and of commit: :class:`ShardAnnotator` turns one shard's URIs into
one Parquet object (one row per image, faces nested, schema ``schemas.annotation``) and writes
it with a single atomic put. Any attempt at a shard, first or retried, writes the same object
name, so retries overwrite rather than duplicate. With ``--crops``, the faces' aligned crops
(:func:`jobs.annotate.crops.crop_rows`, called once per detect window) are written as the
shard's crops object just before that put.

Two ways to feed it (``--decode``):

- ``actor``: the annotator reads and decodes the shard's images itself on a thread pool, a
  window of images ahead of the detector, so decoding overlaps the forward pass and decoded
  pixels never cross the object store (best on a few CPUs).
- ``tasks``: :func:`decode_shards` runs as separate Ray tasks with a fraction of a CPU each and
  hands the annotator uint8 pixels through the object store (best when the detector has a GPU
  and many CPUs can decode for it).
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from retinaface_core.batching import PLAN_WINDOW_BATCHES
from retinaface_core.image_io import RETRYABLE_KINDS, FetchedImage, fetch_image
from retinaface_core.quality import FaceQuality, face_quality
from schemas.annotation import ANNOTATION_SCHEMA, FACE_STRUCT, LANDMARK_NAMES, QUALITY_COLUMNS, SETTINGS_METADATA_KEY
from schemas.crops import CROPS_SCHEMA

from .._model import ModelIdentity, load_detector
from .crops import crop_rows
from .output import OutputStore, parquet_bytes, settings_fingerprint
from .summary import shard_summary

if TYPE_CHECKING:
    from .config import AnnotateConfig

log = logging.getLogger(__name__)


def fetch(config: AnnotateConfig, uri: str) -> FetchedImage:
    """One input object read (storage errors retried with backoff) and decoded, within the job's limits."""
    return fetch_image(
        uri, config.s3, config.max_pixels, max_bytes=config.max_bytes, attempts=config.read_attempts, backoff=config.retry_backoff
    )


def decode_shards(batch: dict[str, np.ndarray], config: AnnotateConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF of ``--decode tasks``: shard rows -> the same rows plus their decoded images.

    ``payload`` holds the pickled list of :class:`FetchedImage` (uint8 pixels, never float).
    """
    payloads = [pickle.dumps([fetch(config, str(u)) for u in uris], protocol=5) for uris in batch["uris"]]
    return {**batch, "payload": np.array(payloads, dtype=object)}


class CommitFailed(RuntimeError):
    """A shard's object could not be written after its retries."""


def with_retries(
    action: Callable[[], Any],
    attempts: int,
    backoff: float,
    what: str,
    retry_if: Callable[[Exception], bool] = lambda exc: True,
) -> Any:
    """``action()``, tried up to ``attempts`` times, waiting ``backoff``, 2 x ``backoff``, ... seconds."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:
            if attempt + 1 == attempts or not retry_if(exc):
                raise
            log.warning("%s, attempt %d of %d failed (%s: %s); trying again", what, attempt + 1, attempts, type(exc).__name__, exc)
            time.sleep(backoff * 2**attempt)


def decode_ahead(
    pool: ThreadPoolExecutor,
    fetch_one: Callable[[str], FetchedImage],
    uris: Iterable[str],
    window: int,
    budget: int,
    threads: int,
) -> Iterator[FetchedImage]:
    """``fetch_one`` of each URI, in order, decoded ahead of the consumer on ``pool``.

    A read starts (as soon as a thread is free, also while the consumer is busy) only while
    fewer than ``window`` images are ahead and the decoded pixels waiting to be consumed take
    less than ``budget`` bytes; at most ``threads`` reads run at once. So what waits is bounded
    by ``budget`` plus one image per thread, however large each image is.
    """
    futures: deque[Future] = deque()
    pending = iter(uris)
    lock = threading.RLock()

    def waiting_bytes() -> int:
        done = (f.result() for f in futures if f.done())
        return sum(item.image.nbytes for item in done if item.image is not None)

    def submit_more(_: Future | None = None) -> None:
        with lock:
            while len(futures) < window and sum(not f.done() for f in futures) < threads and waiting_bytes() < budget:
                uri = next(pending, None)
                if uri is None:
                    return
                future = pool.submit(fetch_one, uri)
                futures.append(future)
                future.add_done_callback(submit_more)

    submit_more()
    while True:
        with lock:
            if not futures:
                return
            future = futures.popleft()
        yield future.result()
        submit_more()


class ShardAnnotator:
    """Ray Data actor UDF: shard rows in, one summary row per shard out (``error`` empty when
    the shard committed, else why its last attempt failed).

    The model is loaded once per actor (:func:`jobs._model.load_detector`: the driver's
    checkpoint, hash checked, on the GPU when the actor was given one). A shard whose work fails
    (a commit that the store keeps refusing, an unexpected error) is tried again, up to
    ``--shard-attempts`` times with backoff, before it is reported failed; the other shards go on.
    """

    def __init__(self, config: AnnotateConfig, run_id: str, model: ModelIdentity, settings: dict[str, Any]) -> None:
        self.config = config
        self.run_id = run_id
        self.model = model
        self.settings_json = json.dumps(settings, sort_keys=True, default=str).encode()
        self.fingerprint = settings_fingerprint(settings)
        torch.set_num_threads(config.threads_per_actor)
        self.detector = load_detector(config.detector, config.s3, model, config.num_gpus_per_actor)
        self.store = OutputStore(config.output, config.s3)
        self.pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = batch.get("payload")
        summaries = [
            self._shard(str(shard_id), [str(u) for u in uris], bool(marked), payloads[i] if payloads is not None else None)
            for i, (shard_id, uris, marked) in enumerate(zip(batch["shard"], batch["uris"], batch["retry"], strict=True))
        ]
        return {key: np.array([s[key] for s in summaries]) for key in summaries[0]}

    def _shard(self, shard_id: str, uris: list[str], marked: bool, payload: bytes | None) -> dict[str, Any]:
        """One shard row's summary: annotated and committed, tried again on failure; ``error`` set if it never committed."""
        try:
            return with_retries(
                lambda: self._annotate_shard(shard_id, pickle.loads(payload) if payload else self._decode_ahead(uris), marked),
                self.config.shard_attempts,
                self.config.retry_backoff,
                f"shard {shard_id}",
                retry_if=lambda exc: not isinstance(exc, CommitFailed),
            )
        except Exception as exc:
            return {**shard_summary(shard_id, []), "error": f"{type(exc).__name__}: {exc}"}

    @property
    def _detect_window(self) -> int:
        """Images per detect call: the bucket policy sorts a window of a few batches by aspect
        ratio, so that each forward pass is full and padded little; exact needs one batch."""
        c = self.config
        return c.batch_size * (PLAN_WINDOW_BATCHES if c.detector.batching == "bucket" else 1)

    def _decode_ahead(self, uris: list[str]) -> Iterator[FetchedImage]:
        # Two detect windows ahead, so that the next window decodes while this one is detected.
        c = self.config
        window = max(2 * self._detect_window, 2 * c.decode_threads)
        return decode_ahead(self.pool, partial(fetch, c), uris, window, c.decode_window_mb * 2**20, c.decode_threads)

    def _annotate_shard(self, shard_id: str, decoded: Iterable[FetchedImage], marked: bool) -> dict:
        start = time.perf_counter()
        stats_before = copy.copy(self.detector.stats)
        window = self._detect_window
        images: list[FetchedImage] = []
        sizes: list[tuple[int, int] | None] = []
        faces: list[dict[str, np.ndarray] | None] = []
        detect_ms: list[float] = []
        quality_ms: list[float] = []
        crops: list[pa.Table] = []
        crop_seconds = 0.0
        batch: list[int] = []
        for item in decoded:
            index = len(images)
            images.append(item)
            sizes.append(None if item.image is None else item.image.shape[:2])
            faces.append(None)
            detect_ms.append(0.0)
            quality_ms.append(0.0)
            if item.image is not None:
                batch.append(index)
            if len(batch) == window:
                crop_seconds += self._detect(batch, images, faces, detect_ms, quality_ms, crops)
                batch = []
        if batch:
            crop_seconds += self._detect(batch, images, faces, detect_ms, quality_ms, crops)
        table = self._table(images, sizes, faces, detect_ms, quality_ms)
        table = table.replace_schema_metadata({SETTINGS_METADATA_KEY: self.settings_json})
        retryable = [item.uri for item in images if item.error_kind in RETRYABLE_KINDS]
        # The mark goes first: a run that dies between the two still leaves the shard to redo.
        if retryable:
            self.store.mark_retry(shard_id, retryable)
        data = parquet_bytes(table, compression="zstd")
        crop_table = pa.concat_tables([CROPS_SCHEMA.empty_table(), *crops])
        crop_table = crop_table.replace_schema_metadata({SETTINGS_METADATA_KEY: self.settings_json})
        try:
            # The crops go first, so that a shard's annotations (its commit) never appear without
            # them; crops without annotations are no part of the output (see docs/annotate.md).
            # A write that fails is retried on its own: the rows are in memory, nothing is redone.
            if self.config.crops:
                crop_data = parquet_bytes(crop_table)
                with_retries(
                    lambda: self.store.write_crops(shard_id, self.fingerprint, crop_data),
                    self.config.shard_attempts,
                    self.config.retry_backoff,
                    f"crops of shard {shard_id}",
                )
            with_retries(
                lambda: self.store.commit_shard(shard_id, self.fingerprint, data),
                self.config.shard_attempts,
                self.config.retry_backoff,
                f"commit of shard {shard_id}",
            )
        except Exception as exc:
            raise CommitFailed(f"{type(exc).__name__}: {exc}") from exc
        if marked and not retryable:
            self.store.clear_retry(shard_id)
        return {
            **shard_summary(shard_id, images, self.detector.stats - stats_before),
            "faces": int(sum(len(f["score"]) for f in faces if f is not None)),
            "crops": crop_table.num_rows,
            "crop_seconds": crop_seconds,
            "seconds": time.perf_counter() - start,
        }

    def _detect(
        self,
        batch: list[int],
        images: list[FetchedImage],
        faces: list,
        detect_ms: list[float],
        quality_ms: list[float],
        crops: list[pa.Table],
    ) -> float:
        """Detect on a window of decoded images, score their faces, crop them (``--crops``), then
        release their pixels; returns the seconds the crops took."""
        start = time.perf_counter()
        pixels = [images[i].image for i in batch]
        detections = self.detector.detect(pixels, self.config.batch_size)
        share = (time.perf_counter() - start) * 1e3 / len(batch)
        qualities = []
        for i, det in zip(batch, detections, strict=True):
            q_start = time.perf_counter()
            quality = face_quality(images[i].image, det.boxes, det.scores, det.landmarks)
            qualities.append(quality)
            faces[i] = _face_columns(det.boxes, det.scores, det.landmarks, quality)
            quality_ms[i] = (time.perf_counter() - q_start) * 1e3
            detect_ms[i] = share
        # The crop hook: the window's decoded images, detections and quality in, crops table rows out.
        crop_start = time.perf_counter()
        if self.config.crops:
            crops.append(crop_rows(self.config, self.run_id, [images[i].uri for i in batch], pixels, detections, qualities))
        for i in batch:
            images[i].image = None
        return time.perf_counter() - crop_start

    def _table(
        self,
        images: list[FetchedImage],
        sizes: list[tuple[int, int] | None],
        faces: list[dict[str, np.ndarray] | None],
        detect_ms: list[float],
        quality_ms: list[float],
    ) -> pa.Table:
        n = len(images)
        counts = np.array([0 if f is None else len(f["score"]) for f in faces], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        present = [f for f in faces if f is not None]
        face_arrays = [
            pa.array(
                np.concatenate([f[field.name] for f in present]) if present else np.zeros(0),
                type=field.type,
            )
            for field in FACE_STRUCT
        ]
        face_list = pa.ListArray.from_arrays(pa.array(offsets), pa.StructArray.from_arrays(face_arrays, fields=list(FACE_STRUCT)))
        columns = {
            "uri": [i.uri for i in images],
            "status": ["ok" if i.error_kind is None else "error" for i in images],
            "error_kind": [i.error_kind for i in images],
            "error": [i.error for i in images],
            "width": [None if hw is None else hw[1] for hw in sizes],
            "height": [None if hw is None else hw[0] for hw in sizes],
            "num_faces": counts,
            "model_name": [self.model.name] * n,
            "model_version": [self.model.version] * n,
            "model_sha256": [self.model.sha256] * n,
            "input_scale": [self.config.detector.scale] * n,
            "tta": [self.config.detector.tta] * n,
            "run_id": [self.run_id] * n,
            "read_ms": [i.read_ms for i in images],
            "decode_ms": [i.decode_ms for i in images],
            "detect_ms": detect_ms,
            "quality_ms": quality_ms,
        }
        arrays = [pa.array(columns[f.name], type=f.type) for f in ANNOTATION_SCHEMA if f.name != "faces"]
        return pa.Table.from_arrays([*arrays, face_list.cast(ANNOTATION_SCHEMA.field("faces").type)], schema=ANNOTATION_SCHEMA)


def _face_columns(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, quality: FaceQuality) -> dict[str, np.ndarray]:
    """The faces of one image as the flat columns of ``FACE_STRUCT``."""
    columns = {
        "face_index": np.arange(len(scores), dtype=np.int32),
        "x1": boxes[:, 0],
        "y1": boxes[:, 1],
        "x2": boxes[:, 2],
        "y2": boxes[:, 3],
        "score": scores,
    }
    for k, name in enumerate(LANDMARK_NAMES):
        columns[f"{name}_x"] = landmarks[:, k, 0]
        columns[f"{name}_y"] = landmarks[:, k, 1]
    for name in QUALITY_COLUMNS:
        columns[name] = getattr(quality, name)
    return columns
