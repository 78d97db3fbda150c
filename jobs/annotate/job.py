"""Annotate every face in a set of images: plan, then stream the shards through a Ray actor pool."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

from retinaface_core.storage import redact

from .._cluster import dropping_stderr_lines, init_ray, pool_size
from .._config import format_config
from .._exit import JobError
from .config import AnnotateConfig
from .output import OutputStore
from .plan import Plan, comparable, prepare, shard_rows
from .summary import summarise
from .worker import ShardAnnotator, decode_shards


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_pipeline(config: AnnotateConfig, run_id: str, plan: Plan, results: list[dict], signals: Signals) -> None:
    """Stream the shards to do through Ray Data, appending one summary dict per shard to
    ``results`` as it comes back (so that an interrupt keeps those that did)."""
    import ray

    init_ray(config.ray_address)
    signals.install()  # ray.init sets a SIGTERM handler of its own
    pool = config.actors or pool_size(ray.cluster_resources(), config.num_cpus_per_actor, config.num_gpus_per_actor)
    ds = shard_rows(plan, config.shard_images, pool)
    # An actor without a shard to work on would only load a model.
    actors = min(plan.todo, pool)
    print(
        f"{plan.todo} shards to do ({len(plan.retry)} again for storage errors); detector actors: {actors}, "
        f"torch threads per actor: {config.threads_per_actor}, decode: {config.decode_mode}",
        flush=True,
    )
    assert plan.lease is not None
    lease = plan.lease.token
    if config.decode_mode == "tasks":
        ds = ds.map_batches(decode_shards, fn_kwargs={"config": config, "lease": lease}, batch_size=1, num_cpus=config.decode_cpus)
    gpus = config.num_gpus_per_actor
    ds = ds.map_batches(
        ShardAnnotator,
        fn_constructor_kwargs={
            "config": config, "run_id": run_id, "model": plan.model, "settings": comparable(plan.settings), "lease": lease,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=config.num_cpus_per_actor,
        num_gpus=gpus if gpus > 0 else None,
    )  # fmt: skip
    with dropping_stderr_lines():
        results.extend(ds.iter_rows())


class ShardsFailed(RuntimeError):
    """Some shards did not commit after their retries, or the run's lease was taken over; the summary names them."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run; ``summary`` (None if it came before any shard was
    planned) says what was committed. Rerunning the same command resumes."""

    def __init__(self, message: str, summary: dict | None) -> None:
        super().__init__(message)
        self.summary = summary


class Signals:
    """SIGINT and SIGTERM while a run holds the main thread (only there can Python handle them).

    Until :attr:`on_first` is set (while planning), a signal raises :class:`KeyboardInterrupt`.
    While shards run, the first calls ``on_first`` (the lease stops: shards in flight commit,
    no new one starts, and the pipeline drains) and the next raises :class:`KeyboardInterrupt`,
    which abandons the shards in flight (their objects are either whole or absent).
    """

    def __init__(self) -> None:
        self.received = 0
        self.on_first: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        name = signal.Signals(signum).name
        if self.received == 1 and self.on_first is not None:
            # os.write: print is not safe to re-enter from a handler.
            os.write(
                2,
                f"\nannotate: {name}: no new shard starts; the shards in flight commit first (interrupt again to abandon them)\n".encode(),
            )
            self.on_first()
            return
        raise KeyboardInterrupt(name)


def save_summary(store: OutputStore, run_id: str, summary: dict) -> None:
    """Write ``_runs/<run_id>/summary.json``; if the store refuses even that (full, unwritable),
    say so: the summary is also the JSON line the job prints."""
    relative = f"_runs/{run_id}/summary.json"
    try:
        store.write_json(relative, summary)
    except Exception as exc:
        print(
            f"annotate: warning: could not write the summary to {store.describe(store.path(relative))} "
            f"({type(exc).__name__}: {redact(str(exc))}); it is the JSON line printed below",
            file=sys.stderr,
            flush=True,
        )


def run(config: AnnotateConfig) -> dict:
    """Run the job; returns the summary (also written to ``_runs/<run_id>/summary.json``).

    Raises :class:`JobError` for anything that stops the job before its work starts,
    :class:`ShardsFailed` (after writing the summary) when shards did not commit, and
    :class:`Interrupted` (after writing the summary, if shards had started) on SIGINT/SIGTERM.
    """
    run_id = config.run_id or new_run_id()
    print(f"annotate run {run_id}\n{format_config(config)}", flush=True)
    start = time.perf_counter()
    signals = Signals()
    signals.install()
    try:
        if config.inventory:
            init_ray(config.ray_address)  # planned in Ray Data: started here, before the handlers
            signals.install()
        try:
            plan = prepare(config, run_id)
        except JobError:
            raise
        except KeyboardInterrupt as exc:
            raise Interrupted("interrupted while planning; nothing was committed", None) from exc
        except Exception as exc:  # a store or registry failing after its client's own retries
            raise JobError(redact(f"{type(exc).__name__}: {exc}")) from exc
        try:
            summary = _annotate(config, run_id, plan, signals, start)
        finally:
            if plan.lease is not None:
                plan.lease.release()
    finally:
        signals.restore()
    _raise_for(config, plan, summary)
    return summary


def _annotate(config: AnnotateConfig, run_id: str, plan: Plan, signals: Signals, start: float) -> dict:
    """The plan's shards through the pipeline, then the summary: written (or printed) whatever happened to the shards."""
    _print_plan(plan)
    results: list[dict] = []
    # From here on a first signal lets the run end in order: shards in flight, then the summary.
    assert plan.lease is not None
    signals.on_first = plan.lease.stop
    crashed: Exception | None = None
    try:
        if len(plan.new) or plan.retry:
            run_pipeline(config, run_id, plan, results, signals)
    except KeyboardInterrupt:
        pass  # the second signal: the shards in flight are abandoned
    except Exception as exc:
        # After a signal, workers that got it too (a Ctrl-C reaches the terminal's whole process
        # group) fail their shards: that is the interrupt. Otherwise the summary of the shards
        # done so far is written, then the error raised.
        if not signals.received:
            crashed = exc
    summary = summarise(run_id, plan, results, time.perf_counter() - start, interrupted=signals.received > 0)
    save_summary(plan.store, run_id, summary)
    if crashed is not None:
        raise crashed
    _print_summary(summary)
    return summary


def _raise_for(config: AnnotateConfig, plan: Plan, summary: dict) -> None:
    """Interrupted, ShardsFailed or nothing, from a run's summary."""
    failed = summary["shards_failed"]
    listed = "; ".join(f"{shard}: {error}" for shard, error in list(failed.items())[:5])
    if summary["interrupted"]:
        raise Interrupted(
            f"interrupted: {summary['shards_processed']} shards committed, {len(failed)} failed, {summary['shards_left']} left",
            summary,
        )
    if summary["lease_lost_to"] is not None:
        raise ShardsFailed(
            f"run {summary['lease_lost_to']} took over output {config.output} (this run's lease was not renewed in time); "
            f"{summary['shards_processed']} shards committed, {summary['shards_left']} left to it"
            + (f", {len(failed)} not committed ({listed})" if failed else "")
        )
    if failed:
        raise ShardsFailed(
            f"{len(failed)} of {plan.todo} shards did not commit after {config.shard_attempts} attempts ({listed}); "
            "the others are committed: rerun to do the rest"
        )


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
