"""What runs on the Ray workers of the annotation job: read and decode, detect, score, commit a shard.

A shard is the unit of work and of commit: :class:`ShardAnnotator` turns one shard's URIs into
one Parquet object (one row per image, faces nested, schema ``schemas.annotation``) and writes
it with a single atomic put. Any attempt at a shard, first or retried, writes the same object
name, so retries overwrite rather than duplicate. With ``--crops``, the faces' aligned crops
(:func:`jobs.annotate.crops.crop_rows`, called once per detect window) are written as the
shard's crops object just before that put.

Two ways to feed it (``--decode``):

- ``actor`` (the default): the annotator's reader threads read the shard's objects a window of
  images ahead of the detector. On a GPU they only probe JPEGs (header, size, orientation) and
  the window is decoded there in one batch (nvJPEG), with everything the device cannot decode
  done on the CPU; on a CPU they decode. Pixels never cross the object store.
- ``tasks``: :func:`decode_shards` runs as separate Ray tasks with a fraction of a CPU each and
  hands the annotator uint8 pixels through the object store (for CPU detectors on nodes whose
  CPUs the actors do not use).
"""

from __future__ import annotations

import copy
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

from retinaface_core.batching import detect_window
from retinaface_core.device_decode import decode_fetched, device_decoder_available
from retinaface_core.image_io import RETRYABLE_KINDS, FetchedImage, fetch_image
from retinaface_core.quality import quality_features
from schemas.annotation import ANNOTATION_SCHEMA, FACE_STRUCT, file_metadata
from schemas.crops import CROPS_SCHEMA

from .._model import ModelIdentity, load_detector
from .crops import crop_rows
from .output import LeaseLost, OutputStore, parquet_bytes, settings_fingerprint
from .summary import shard_summary

if TYPE_CHECKING:
    from .config import AnnotateConfig

log = logging.getLogger(__name__)

_FACE_COLUMNS = tuple(field.name for field in FACE_STRUCT)[1:]
"""The face struct's columns after ``face_index``: the order of the rows a window's faces come back in."""


def fetch(config: AnnotateConfig, uri: str, device_jpeg: bool = False) -> FetchedImage:
    """One input object read (storage errors retried with backoff) and decoded, within the job's
    limits; with ``device_jpeg`` a JPEG the device decodes is only probed (see :func:`fetch_image`)."""
    return fetch_image(
        uri,
        config.s3,
        config.max_pixels,
        max_bytes=config.max_bytes,
        attempts=config.read_attempts,
        backoff=config.retry_backoff,
        device_jpeg=device_jpeg,
    )


def decode_shards(batch: dict[str, np.ndarray], config: AnnotateConfig, lease: str) -> dict[str, np.ndarray]:
    """Ray Data UDF of ``--decode tasks``: shard rows -> the same rows plus their decoded images.

    ``payload`` holds the pickled list of :class:`FetchedImage` (uint8 pixels, never float);
    empty for a shard the run no longer starts (see :meth:`OutputStore.may_start`).
    """
    store = OutputStore(config.output, config.s3)
    uris = [[str(u) for u in shard] for shard in batch["uris"]]
    payloads = [pickle.dumps([fetch(config, u) for u in shard], protocol=5) if store.may_start(lease) else b"" for shard in uris]
    # Lists, not the object arrays of arrays Ray Data hands in: those it cannot turn back into Arrow.
    return {**batch, "uris": np.array(uris + [None], dtype=object)[:-1], "payload": np.array(payloads, dtype=object)}


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
        done = [f.result() for f in futures if f.done()]
        return sum(item.image.nbytes for item in done if item.image is not None) + sum(len(item.encoded or b"") for item in done)

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

    def __init__(self, config: AnnotateConfig, run_id: str, model: ModelIdentity, settings: dict[str, Any], lease: str) -> None:
        self.config = config
        self.run_id = run_id
        self.lease = lease
        self.model = model
        self.metadata = file_metadata(settings)
        self.fingerprint = settings_fingerprint(settings)
        torch.set_num_threads(config.threads_per_actor)
        self.detector = load_detector(config.detector, config.s3, model, config.num_gpus_per_actor)
        # JPEGs are decoded on the GPU a window at a time; the readers only read and probe them.
        self.device_jpeg = self.detector.device.type == "cuda" and device_decoder_available()
        log.info("detector on %s ready (warm-up %.1f s)", self.detector.device, self.detector.warm_up(config.batch_size))
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
        """One shard row's summary: annotated and committed, tried again on failure; ``error`` set if it never committed;
        ``skipped`` if the run no longer starts shards (interrupted, or its lease lost)."""
        if not self.store.may_start(self.lease):
            return {**shard_summary(shard_id, []), "skipped": True}
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
        return detect_window(self.config.batch_size, self.config.detector.batching)

    def _decode_ahead(self, uris: list[str]) -> Iterator[FetchedImage]:
        # Two detect windows ahead, so that the next window decodes while this one is detected.
        c = self.config
        window = max(2 * self._detect_window, 2 * c.decode_threads)
        fetch_one = partial(fetch, c, device_jpeg=self.device_jpeg)
        return decode_ahead(self.pool, fetch_one, uris, window, c.decode_window_mb * 2**20, c.decode_threads)

    def _annotate_shard(self, shard_id: str, decoded: Iterable[FetchedImage], marked: bool) -> dict:
        start = time.perf_counter()
        stats_before = copy.copy(self.detector.stats)
        window = self._detect_window
        images: list[FetchedImage] = []
        sizes: list[tuple[int, int] | None] = []
        faces: list[np.ndarray | None] = []
        detect_ms: list[float] = []
        quality_ms: list[float] = []
        crops: list[pa.Table] = []
        crop_seconds = 0.0
        batch: list[int] = []
        for item in decoded:
            index = len(images)
            images.append(item)
            sizes.append(item.size)
            faces.append(None)
            detect_ms.append(0.0)
            quality_ms.append(0.0)
            if item.size is not None:
                batch.append(index)
            if len(batch) == window:
                crop_seconds += self._detect(batch, images, faces, detect_ms, quality_ms, crops)
                batch = []
        if batch:
            crop_seconds += self._detect(batch, images, faces, detect_ms, quality_ms, crops)
        table = self._table(images, [s if f is not None else None for s, f in zip(sizes, faces)], faces, detect_ms, quality_ms)
        table = table.replace_schema_metadata(self.metadata)
        retryable = [item.uri for item in images if item.error_kind in RETRYABLE_KINDS]
        # The mark goes first: a run that dies between the two still leaves the shard to redo.
        if retryable:
            self.store.mark_retry(shard_id, retryable)
        data = parquet_bytes(table, compression="zstd")
        crop_table = pa.concat_tables([CROPS_SCHEMA.empty_table(), *crops])
        crop_table = crop_table.replace_schema_metadata(self.metadata)
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
                lambda: self.store.commit_shard(shard_id, self.fingerprint, data, self.lease),
                self.config.shard_attempts,
                self.config.retry_backoff,
                f"commit of shard {shard_id}",
                retry_if=lambda exc: not isinstance(exc, LeaseLost),
            )
        except Exception as exc:
            raise CommitFailed(f"{type(exc).__name__}: {exc}") from exc
        if marked and not retryable:
            self.store.clear_retry(shard_id)
        return {
            **shard_summary(shard_id, images, self.detector.stats - stats_before),
            "faces": int(sum(len(f) for f in faces if f is not None)),
            "crops": crop_table.num_rows,
            "crop_seconds": crop_seconds,
            "seconds": time.perf_counter() - start,
        }

    def _detect(
        self,
        batch: list[int],
        images: list[FetchedImage],
        faces: list[np.ndarray | None],
        detect_ms: list[float],
        quality_ms: list[float],
        crops: list[pa.Table],
    ) -> float:
        """Decode (on the device) what waits for it, detect, score and crop (``--crops``) the faces,
        then release the pixels; returns the seconds the crops took.

        ``faces[i]`` becomes image i's (faces, len(FACE_STRUCT) - 1) float32 rows: the face
        struct's columns after ``face_index``, in its order. Everything per pixel and per face
        stays on the detector's device until one transfer per window.
        """
        items = [images[i] for i in batch]
        start = time.perf_counter()
        decode_fetched(items, self.detector.device, self.config.max_pixels)
        ok = [i for i in batch if images[i].image is not None]
        pixels = [images[i].image for i in ok]
        found = self.detector.detect_faces(pixels, self.config.batch_size)
        scored = time.perf_counter()
        tensors = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in pixels]
        quality = quality_features(tensors, found.image_index, found.boxes, found.scores, found.landmarks)
        rows = torch.cat([found.boxes, found.scores[:, None], found.landmarks.reshape(-1, 10), quality.to(found.boxes.device)], dim=1)
        host, counts = rows.cpu().numpy(), found.counts().cpu().numpy()
        end = time.perf_counter()
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for j, i in enumerate(ok):
            faces[i] = host[bounds[j] : bounds[j + 1]]
            detect_ms[i] = (scored - start) * 1e3 / len(ok)
            quality_ms[i] = (end - scored) * 1e3 / len(ok)
        # The crop hook: the window's pixels and faces (landmarks still on the device) in, crops rows out.
        if self.config.crops:
            image_index = np.repeat(np.arange(len(ok)), counts)
            size, score = host[:, _FACE_COLUMNS.index("face_size")], host[:, _FACE_COLUMNS.index("quality")]
            crops.append(
                crop_rows(self.config, self.run_id, [images[i].uri for i in ok], tensors, image_index, found.landmarks, size, score)
            )
        for item in items:
            item.image = None
        return time.perf_counter() - end

    def _table(
        self,
        images: list[FetchedImage],
        sizes: list[tuple[int, int] | None],
        faces: list[np.ndarray | None],
        detect_ms: list[float],
        quality_ms: list[float],
    ) -> pa.Table:
        n = len(images)
        counts = np.array([0 if f is None else len(f) for f in faces], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        flat = np.concatenate([f for f in faces if f is not None] + [np.zeros((0, len(FACE_STRUCT) - 1), np.float32)])
        # Faces of an image are numbered in the detector's order (descending score) from 0.
        face_index = np.arange(len(flat), dtype=np.int32) - np.repeat(offsets[:-1], counts)
        face_arrays = [pa.array(face_index, type=FACE_STRUCT[0].type)] + [
            pa.array(flat[:, c], type=FACE_STRUCT[c + 1].type) for c in range(len(FACE_STRUCT) - 1)
        ]
        # An error row has no faces at all (null), not zero faces.
        failed = np.array([f is None for f in faces], bool)
        face_list = pa.ListArray.from_arrays(
            pa.array(offsets), pa.StructArray.from_arrays(face_arrays, fields=list(FACE_STRUCT)), mask=pa.array(failed)
        )
        columns = {
            "uri": [i.uri for i in images],
            "status": ["ok" if i.error_kind is None else "error" for i in images],
            "error_kind": [i.error_kind for i in images],
            "error": [i.error for i in images],
            "width": [None if hw is None else hw[1] for hw in sizes],
            "height": [None if hw is None else hw[0] for hw in sizes],
            "num_faces": pa.array(counts, mask=failed),
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
