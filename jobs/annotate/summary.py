"""The annotation job's summaries: one row per shard from the workers, one dict per run."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from retinaface_core.batching import BatchStats
from retinaface_core.image_io import RETRYABLE_KINDS, FetchedImage
from retinaface_core.storage import redact

if TYPE_CHECKING:
    from .plan import Plan


def shard_summary(shard_id: str, images: list[FetchedImage], stats: BatchStats | None = None) -> dict[str, Any]:
    """A shard's summary row; ``error`` is set by the caller for a shard that did not commit,
    ``skipped`` for one not started because the run stopped (interrupted, or its lease lost).

    ``passes`` .. ``content_pixels`` are the shard's forward passes (:class:`BatchStats`)."""
    errors = Counter(item.error_kind for item in images if item.error_kind)
    stats = stats or BatchStats()
    return {
        "shard": shard_id,
        "images": len(images),
        "faces": 0,
        "crops": 0,
        "crop_seconds": 0.0,
        "errors": sum(errors.values()),
        "errors_by_kind": json.dumps(dict(errors)),
        "retryable_errors": sum(errors[kind] for kind in RETRYABLE_KINDS),
        "seconds": 0.0,
        "error": "",
        "skipped": False,
        "passes": stats.passes,
        "detected": stats.images,
        "slots": stats.slots,
        "canvas_pixels": stats.canvas_pixels,
        "content_pixels": stats.content_pixels,
    }


def committed(results: list[dict]) -> list[dict]:
    """The summary rows of the shards that committed (neither failed nor skipped)."""
    return [r for r in results if not r["error"] and not r["skipped"]]


def summarise(run_id: str, plan: Plan, results: list[dict], seconds: float, interrupted: bool = False) -> dict:
    """The run's summary: ``objects_listed`` = ``images_listed`` + the ``objects_skipped`` counts,
    ``images_listed`` = ``images_already_annotated`` + ``images_new``."""
    done = committed(results)
    images = sum(int(r["images"]) for r in done)
    kinds: Counter = Counter()
    for r in done:
        kinds.update(json.loads(r["errors_by_kind"]))
    stats = BatchStats(*(sum(int(r[key]) for r in done) for key in ("passes", "detected", "slots", "canvas_pixels", "content_pixels")))
    return {
        "run_id": run_id,
        "objects_listed": plan.objects,
        "objects_skipped": dict(sorted(plan.skipped.counts.items())),
        "images_listed": plan.listed,
        "images_already_annotated": plan.listed - len(plan.new),
        "images_new": len(plan.new),
        # One input's listing cannot tell another input's images from removed ones.
        "images_removed_from_input": plan.removed if len(plan.inputs) <= 1 else None,
        "shards_total": plan.committed + plan.todo - len(plan.retry),
        "shards_skipped_already_committed": plan.committed - len(plan.retry),
        "shards_redone_for_storage_errors": len(plan.retry),
        "shards_processed": len(done),
        "shards_failed": {r["shard"]: redact(r["error"]) for r in results if r["error"]},
        "shards_with_storage_errors": sum(1 for r in done if int(r["retryable_errors"])),
        "images": images,
        "faces": sum(int(r["faces"]) for r in done),
        "crops": sum(int(r["crops"]) for r in done),
        "crop_seconds": round(sum(float(r["crop_seconds"]) for r in done), 3),
        "worker_seconds": round(sum(float(r["seconds"]) for r in done), 3),
        "errors": sum(int(r["errors"]) for r in done),
        "errors_by_kind": dict(sorted(kinds.items())),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 3) if seconds > 0 else 0.0,
        "forward_passes": stats.passes,
        "batch_fill": round(stats.batch_fill, 4),
        "padding_fraction": round(stats.padding_fraction, 4),
        **fault_summary(plan, results, interrupted),
    }


def fault_summary(plan: Plan, results: list[dict], interrupted: bool) -> dict[str, Any]:
    """What stopped the run short: ``interrupted`` (SIGINT/SIGTERM), ``lease_lost_to`` (the run
    that took the output over, if one did), ``shards_left`` (neither committed nor failed: not
    started, or abandoned in flight; the next run does them) and ``shards_quarantined`` (files
    moved out of ``annotations/`` before the work, by their URIs)."""
    failed = sum(1 for r in results if r["error"])
    lost = plan.lease.lost_to if plan.lease is not None else None
    return {
        "interrupted": interrupted,
        "lease_lost_to": lost.get("run_id") if lost is not None else None,
        "shards_left": max(0, plan.todo - len(committed(results)) - failed),
        "shards_quarantined": plan.quarantined,
    }
