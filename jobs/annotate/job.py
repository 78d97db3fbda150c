"""Annotate every face in a set of images: plan, then stream the shards through a Ray actor pool."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

from retinaface_core.storage import redact

from .._cluster import dropping_stderr_lines, init_ray, pool_size
from .._config import format_config
from .._exit import JobError
from .config import AnnotateConfig
from .plan import Plan, comparable, prepare, shard_rows
from .summary import summarise
from .worker import ShardAnnotator, decode_shards


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_pipeline(config: AnnotateConfig, run_id: str, plan: Plan) -> list[dict]:
    """Stream the shards to do through Ray Data; returns one summary dict per shard."""
    import ray

    init_ray(config.ray_address)
    pool = config.actors or pool_size(ray.cluster_resources(), config.num_cpus_per_actor, config.num_gpus_per_actor)
    ds = shard_rows(plan, config.shard_images, pool)
    # An actor without a shard to work on would only load a model.
    actors = min(plan.todo, pool)
    print(
        f"{plan.todo} shards to do ({len(plan.retry)} again for storage errors); detector actors: {actors}, "
        f"torch threads per actor: {config.threads_per_actor}, decode: {config.decode_mode}",
        flush=True,
    )
    if config.decode_mode == "tasks":
        ds = ds.map_batches(decode_shards, fn_kwargs={"config": config}, batch_size=1, num_cpus=config.decode_cpus)
    gpus = config.num_gpus_per_actor
    ds = ds.map_batches(
        ShardAnnotator,
        fn_constructor_kwargs={"config": config, "run_id": run_id, "model": plan.model, "settings": comparable(plan.settings)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=config.num_cpus_per_actor,
        num_gpus=gpus if gpus > 0 else None,
    )
    with dropping_stderr_lines():
        return list(ds.iter_rows())


class ShardsFailed(RuntimeError):
    """Some shards did not commit after their retries; the summary names them."""


def run(config: AnnotateConfig) -> dict:
    """Run the job; returns the summary (also written to ``_runs/<run_id>/summary.json``).

    Raises :class:`JobError` for anything that stops the job before its work starts, and
    :class:`ShardsFailed` (after writing the summary) when shards did not commit.
    """
    run_id = config.run_id or new_run_id()
    print(f"annotate run {run_id}\n{format_config(config)}", flush=True)
    start = time.perf_counter()
    try:
        plan = prepare(config, run_id)
    except JobError:
        raise
    except Exception as exc:  # a store or registry failing after its client's own retries
        raise JobError(redact(f"{type(exc).__name__}: {exc}")) from exc
    _print_plan(plan)
    results = run_pipeline(config, run_id, plan) if len(plan.new) or plan.retry else []
    summary = summarise(run_id, plan, results, time.perf_counter() - start)
    plan.store.write_json(f"_runs/{run_id}/summary.json", summary)
    _print_summary(summary)
    failed = summary["shards_failed"]
    if failed:
        listed = "; ".join(f"{shard}: {error}" for shard, error in list(failed.items())[:5])
        raise ShardsFailed(
            f"{len(failed)} of {plan.todo} shards did not commit after {config.shard_attempts} attempts ({listed}); "
            "the others are committed: rerun the same command to do the rest"
        )
    return summary


def _print_plan(plan: Plan) -> None:
    print(
        f"{plan.objects} objects listed: {plan.listed} images ({plan.listed - len(plan.new)} already annotated in {plan.committed} "
        f"committed shards, {len(plan.new)} new), {plan.skipped.total()} skipped; {len(plan.retry)} shards to redo for storage errors",
        flush=True,
    )
    if plan.skipped.total():
        print(redact(f"annotate: skipped {plan.skipped.describe()}"), flush=True)
    if plan.removed and len(plan.inputs) <= 1:
        examples = ", ".join(plan.removed_examples)
        print(
            f"annotate: warning: {plan.removed} annotated images are no longer in the input (e.g. {examples}); "
            "their rows stay in the output",
            flush=True,
        )


def _print_summary(summary: dict) -> None:
    print(
        f"annotate: {summary['images']} images, {summary['faces']} faces ({summary['crops']} cropped), {summary['errors']} errors "
        f"in {summary['seconds']:.1f} s = {summary['images_per_second']:.2f} images/s; "
        f"{summary['shards_processed']} shards done, {summary['shards_skipped_already_committed']} skipped "
        f"(already committed); {summary['forward_passes']} forward passes, batch fill {summary['batch_fill']:.2f}, "
        f"padding {summary['padding_fraction']:.1%} of computed pixels",
        flush=True,
    )
    print(json.dumps(summary), flush=True)
    if summary["shards_with_storage_errors"]:
        print(
            f"annotate: {summary['shards_with_storage_errors']} shards hold images the store failed to serve "
            "(error_kind 'storage'); rerun the same command to retry just those",
            flush=True,
        )
