"""Annotate every face in a set of images: object storage -> Ray actor pool -> Parquet, exactly once.

Run locally (starts a local Ray)::

    python -m jobs.annotate --input s3://bucket/photos/ --output s3://bucket/faces/

or on a cluster::

    ray job submit --working-dir . -- python -m jobs.annotate --input ... --output ...

The input is listed and cut into shards on the driver, or, from an inventory (``--inventory``),
planned in Ray Data without holding the URIs on the driver; images already in committed shards
of the output are skipped; the rest stream through a Ray Data actor pool, each shard becoming
one Parquet object whose write is its commit. See ``docs/annotate.md`` for the flags, the
output layout and the queries.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

from retinaface_core import DetectorSettings, StorageOptions
from retinaface_core.batching import PLAN_WINDOW_BATCHES
from retinaface_core.batching import BatchStats
from retinaface_core.image_io import DEFAULT_MAX_PIXELS
from retinaface_core.quality import QUALITY_MODEL_VERSION
from retinaface_core.storage import redact
from schemas.annotation import SCHEMA_VERSION

from ._cluster import init_ray, pool_size
from ._config import config_dict, format_config, parse_config
from ._model import ModelIdentity, resolve_model_identity
from ._inventory import open_inventory, plan_inventory, union
from ._storage import DigestSet, JobError, OutputStore, Shard, list_input, make_shards, settings_fingerprint, shard_table, uri_digests

if TYPE_CHECKING:
    import ray.data


@dataclass
class AnnotateConfig:
    """Detect faces with landmarks and quality scores in images under a URI prefix or in a manifest."""

    input: str = field(metadata={"help": "URI prefix listed recursively for images, or a manifest (.txt/.lst/.csv one URI per line, or .parquet with a 'uri' column); with --inventory, the prefix the inventory's entries are selected under"})
    output: str = field(metadata={"help": "output dataset URI (local path, file://, s3://, ...)"})
    inventory: str | None = field(default=None, metadata={"help": "take the input from an inventory instead of listing --input, planned with Ray Data so the driver never holds every URI (for 10^8 objects): an S3 Inventory manifest.json (CSV or Parquet) of --input's bucket, or a Parquet file or folder with a 'uri' column"})
    images_per_shard: int = field(default=1000, metadata={"help": "images per output file, the unit of commit (fewer when there are too few new images to give every actor a shard)"})
    detector: DetectorSettings = field(default_factory=lambda: DetectorSettings(scale="long:640", batching="bucket"), metadata={"flatten": ""})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "images with more pixels become error rows (decompression bombs)"})
    max_bytes: int = field(default=256 * 2**20, metadata={"help": "objects larger than this many bytes become error rows without being read whole"})
    read_attempts: int = field(default=4, metadata={"help": "reads of an object the store fails to serve (5xx, timeouts, resets, throttling) before it becomes a 'storage' error row, which the next run retries"})
    shard_attempts: int = field(default=3, metadata={"help": "attempts at a shard whose work fails (e.g. its commit) before the run reports it failed"})
    retry_backoff: float = field(default=1.0, metadata={"help": "seconds before the first retry of a read or a shard; doubled for each next one"})
    decode_window_mb: int = field(default=1024, metadata={"help": "decoded pixels (MiB) an actor holds ahead of the detector; with --decode-threads images being decoded, this bounds its memory"})
    actors: int | None = field(default=None, metadata={"help": "detector actors (default: one per GPU with --num-gpus-per-actor, else one per --num-cpus-per-actor CPUs of the cluster)"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    num_gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per detector actor (0: CPU)"})
    num_cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per detector actor"})
    decode: str = field(default="auto", metadata={"help": "where images are read and decoded: actor (the detector actor's reader threads; JPEGs decoded on its GPU where it has one), tasks (separate CPU tasks decode and hand over pixels), auto (actor)", "choices": ["auto", "actor", "tasks"]})
    decode_threads: int = field(default=2, metadata={"help": "decode threads per actor (--decode actor)"})
    decode_cpus: float = field(default=0.5, metadata={"help": "CPUs per decode task (--decode tasks)"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads per actor (default: --num-cpus-per-actor, at least 1)"})
    overwrite: bool = field(default=False, metadata={"help": "delete previous results under --output and start over"})
    s3: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join: auto, host:port, ray://... (default: $RAY_ADDRESS, else a new local Ray)"})
    run_id: str | None = field(default=None, metadata={"help": "id recorded in every row of this run (default: time + random suffix)"})

    @property
    def decode_mode(self) -> str:
        return "actor" if self.decode == "auto" else self.decode

    @property
    def shard_images(self) -> int:
        """Images per shard: ``--images-per-shard``; with ``--decode tasks``, whose decode task
        hands a whole shard's pixels to the actor in one object (1,000 decoded photos would be
        gigabytes), at most one batching window (``PLAN_WINDOW_BATCHES`` batches)."""
        if self.decode_mode == "actor":
            return self.images_per_shard
        return min(self.images_per_shard, PLAN_WINDOW_BATCHES * self.batch_size)

    @property
    def threads_per_actor(self) -> int:
        return self.torch_threads or max(1, round(self.num_cpus_per_actor))

    def fingerprint(self) -> dict:
        """The settings that change the content of a shard's rows: resuming into an output written
        with other values would mix two kinds of results in one dataset. Where the model came
        from (a name, then its path) may differ; its sha256, recorded beside these, may not."""
        detector = {k: v for k, v in dataclasses.asdict(self.detector).items() if k not in ("weights", "model")}
        return {**detector, "max_pixels": self.max_pixels, "max_bytes": self.max_bytes}


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class NewImages(Protocol):
    """The listed URIs that no committed shard holds, cut into shards once the pool size is known."""

    def __len__(self) -> int: ...

    def shard_rows(self, images_per_shard: int) -> ray.data.Dataset | None:
        """Materialized rows ``shard``, ``uris``, ``retry`` (see :func:`shard_table`), one block
        each; None if none."""


@dataclass(frozen=True)
class ListedImages:
    """New URIs held on the driver (sorted Arrow strings), cut into consecutive shards there."""

    uris: pa.ChunkedArray

    def __len__(self) -> int:
        return len(self.uris)

    def shard_rows(self, images_per_shard: int) -> ray.data.Dataset | None:
        import ray

        shards = make_shards(self.uris, images_per_shard)
        return ray.data.from_arrow([shard_table([s], retry=False) for s in shards]) if shards else None


@dataclass
class Plan:
    """What a run does, decided before any annotation work.

    ``new`` are the listed URIs that no committed shard holds, ``retry`` the committed shards to
    redo for their storage errors (id -> their URIs), ``removed`` the count of committed URIs
    the input no longer has (reported, kept; ``removed_examples`` up to 3 of them), ``todo``
    the count of shards to do once they are cut.
    """

    store: OutputStore
    listed: int
    committed: int
    new: NewImages
    retry: dict[str, list[str]]
    removed: int
    removed_examples: list[str]
    settings: dict
    model: ModelIdentity
    todo: int = 0


def output_settings(config: AnnotateConfig, model: ModelIdentity) -> dict:
    """What every shard of an output is made with: ``_dataset.json`` and each shard's metadata.
    Where the checkpoint came from may differ between runs (a name, then its path); its sha256
    is what must not change."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model_name": model.name,
        "model_version": model.version,
        "model_checkpoint": redact(model.checkpoint) if model.checkpoint else None,
        "model_sha256": model.sha256,
        "quality_model_version": QUALITY_MODEL_VERSION,
        **config.fingerprint(),
    }


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "model_checkpoint"}


def prepare(config: AnnotateConfig, run_id: str) -> Plan:
    """Every job-level check, then the plan: on the driver from a listing, or in Ray Data from
    an inventory (``--inventory``; its files are checked before any Ray work).

    Raises :class:`JobError` with a message naming the problem: bad settings, a checkpoint that
    cannot be found, an input that cannot be listed, an inventory that cannot be read, an output
    that cannot be written, or an output written with other settings (by an earlier run, by a
    concurrent one, or found in a shard's own name).
    """
    if config.batch_size < 1 or (config.actors is not None and config.actors < 1):
        raise JobError("--batch-size and --actors must be >= 1")
    if config.num_cpus_per_actor <= 0 and config.num_gpus_per_actor <= 0:
        raise JobError("an actor needs --num-cpus-per-actor > 0 or --num-gpus-per-actor > 0")
    if min(config.images_per_shard, config.read_attempts, config.shard_attempts, config.max_bytes, config.decode_window_mb, config.decode_threads) < 1:
        raise JobError("--images-per-shard, --read-attempts, --shard-attempts, --max-bytes, --decode-window-mb and --decode-threads must be >= 1")
    model, _ = resolve_model_identity(config.detector, config.s3)
    store = OutputStore(config.output, config.s3)
    store.check_writable()
    inventory = open_inventory(config.inventory, config.input, config.s3) if config.inventory else None
    uris = None if inventory else list_input(config.input, config.s3)
    if config.overwrite:
        store.clear()
    settings = output_settings(config, model)
    # The first run to create _dataset.json owns the output; a concurrent run that lost the race
    # reads the winner's settings here and is refused below if they differ.
    if not store.create_json(OutputStore.DATASET, settings):
        stored = store.read_json(OutputStore.DATASET) or {}
        changed = sorted(k for k in _comparable(settings).keys() | _comparable(stored).keys() if stored.get(k) != settings.get(k))
        if changed:
            raise JobError(
                f"output {config.output} holds results made with other settings ({', '.join(changed)}: "
                f"{ {k: stored.get(k) for k in changed} } vs { {k: settings.get(k) for k in changed} }); "
                "use --overwrite to start over, or another --output"
            )
    listing = store.listing()
    fingerprint = settings_fingerprint(_comparable(settings))
    mixed = {shard: fp for shard, fp in listing.committed.items() if fp != fingerprint}
    if mixed:
        shard, fp = next(iter(sorted(mixed.items())))
        found = store.read_settings(shard, fp)
        raise JobError(
            f"output {config.output} holds {len(mixed)} committed shards made with other settings than "
            f"_dataset.json says (e.g. shard {shard}: {found or 'written by an older version'}); "
            "use --overwrite to start over, or another --output"
        )
    # What is already annotated comes from the output itself (its uri column), so a grown input
    # gets only its new objects annotated, in new shards, and no URI is ever annotated twice.
    if inventory is not None:
        init_ray(config.ray_address)
        found = plan_inventory(inventory, [store.shard_path(s, fp) for s, fp in sorted(listing.committed.items())], store.fs)
        listed, new, removed, examples = found.listed, found.new, found.removed, found.removed_examples
    else:
        listed = len(uris)
        new, removed, examples = split_listing(uris, store, listing.committed)
        del uris  # the new ones are what the run keeps
    retry_ids = sorted(listing.retry & listing.committed.keys())
    retry = {shard: store.read_uris({shard: listing.committed[shard]}).to_pylist() for shard in retry_ids}
    store.write_json(f"_runs/{run_id}/config.json", {"run_id": run_id, **config_dict(config)})
    return Plan(store, listed, len(listing.committed), new, retry, removed, examples, settings, model)


# Committed URIs looked up at once: enough that the sorted queries walk the listing's digests
# in order, few enough to hold (~15 MB with their strings).
LOOKUP_ROWS = 1 << 18


def split_listing(uris: pa.ChunkedArray, store: OutputStore, committed: dict[str, str]) -> tuple[ListedImages, int, list[str]]:
    """The listed URIs (each once) that no committed shard holds, and how many committed URIs
    are no longer listed, with up to 3 of them.

    Compared by digest (:class:`DigestSet`): the listing's digests are kept (24 B per URI, 40
    at the peak while they are sorted) and the committed ``uri`` columns are streamed past them
    ``LOOKUP_ROWS`` at a time. Measured with the listing, all committed, at 3*10^6 URIs: 105 B
    per URI at the peak, where Arrow's ``is_in`` needed 255 (the committed URIs, a copy and a
    hash set of them; ``benchmarks/bench_plan.py``).
    """
    listed = DigestSet(uri_digests(uris))
    annotated = np.zeros(len(uris), bool)
    removed, examples = 0, []
    for done, digests in _lookup_rounds(store.uri_batches(committed)):
        found = listed.find(digests)
        annotated[found[found >= 0]] = True
        missing = found < 0
        removed += int(missing.sum())
        examples += done.filter(pa.array(missing))[: 3 - len(examples)].to_pylist()
    del listed
    new = uris.filter(pa.array(~annotated)) if annotated.any() else uris
    return ListedImages(new), removed, examples


def _lookup_rounds(batches: Iterator[pa.Array]) -> Iterator[tuple[pa.ChunkedArray, np.ndarray]]:
    """``batches`` of URIs regrouped into rounds of about ``LOOKUP_ROWS``, with their digests."""
    held: list[pa.Array] = []
    digests: list[np.ndarray] = []
    for batch in batches:
        held.append(batch)
        digests.append(uri_digests(batch))
        if sum(map(len, digests)) >= LOOKUP_ROWS:
            yield pa.chunked_array(held, pa.string()), np.concatenate(digests)
            held, digests = [], []
    if held:
        yield pa.chunked_array(held, pa.string()), np.concatenate(digests)


def shard_rows(plan: Plan, images_per_shard: int, actors: int) -> ray.data.Dataset:
    """The shards to do, one row and one block each, so that the actor pool hands shards out
    one at a time (materialized: no task of its own competes with the actors for CPUs): those
    to redo, then the new URIs in
    shards of ``images_per_shard``, cut finer when there are too few to give each actor one.
    Sets ``plan.todo``."""
    import ray

    size = max(1, min(images_per_shard, -(-len(plan.new) // actors)))
    parts = [ray.data.from_arrow([shard_table([Shard(shard, uris)], retry=True) for shard, uris in plan.retry.items()])] if plan.retry else []
    new = plan.new.shard_rows(size)
    if new is not None:
        parts.append(new)
    plan.todo = sum(part.count() for part in parts)
    return union(parts)


def run_pipeline(config: AnnotateConfig, run_id: str, plan: Plan) -> list[dict]:
    """Stream the shards to do through Ray Data; returns one summary dict per shard."""
    import ray

    from ._annotator import ShardAnnotator, decode_shards

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
        fn_constructor_kwargs={"config": config, "run_id": run_id, "model": plan.model, "settings": _comparable(plan.settings)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=config.num_cpus_per_actor,
        num_gpus=gpus if gpus > 0 else None,
    )
    return list(ds.iter_rows())


class ShardsFailed(RuntimeError):
    """Some shards did not commit after their retries; the summary names them."""


EXIT_SHARDS_FAILED = 3


def summarise(run_id: str, plan: Plan, results: list[dict], seconds: float) -> dict:
    done = [r for r in results if not r["error"]]
    images = sum(int(r["images"]) for r in done)
    kinds: Counter = Counter()
    for r in done:
        kinds.update(json.loads(r["errors_by_kind"]))
    stats = BatchStats(*(sum(int(r[key]) for r in done) for key in ("passes", "detected", "slots", "canvas_pixels", "content_pixels")))
    return {
        "run_id": run_id,
        "images_listed": plan.listed,
        "images_new": len(plan.new),
        "images_removed_from_input": plan.removed,
        "shards_total": plan.committed + plan.todo - len(plan.retry),
        "shards_skipped_already_committed": plan.committed - len(plan.retry),
        "shards_redone_for_storage_errors": len(plan.retry),
        "shards_processed": len(done),
        "shards_failed": {r["shard"]: redact(r["error"]) for r in results if r["error"]},
        "shards_with_storage_errors": sum(1 for r in done if int(r["retryable_errors"])),
        "images": images,
        "faces": sum(int(r["faces"]) for r in done),
        "errors": sum(int(r["errors"]) for r in done),
        "errors_by_kind": dict(sorted(kinds.items())),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 3) if seconds > 0 else 0.0,
        "forward_passes": stats.passes,
        "batch_fill": round(stats.batch_fill, 4),
        "padding_fraction": round(stats.padding_fraction, 4),
    }


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
    print(
        f"{plan.listed} images listed, {plan.listed - len(plan.new)} already annotated in {plan.committed} committed shards, "
        f"{len(plan.new)} new; {len(plan.retry)} shards to redo for storage errors",
        flush=True,
    )
    if plan.removed:
        examples = ", ".join(plan.removed_examples)
        print(
            f"annotate: warning: {plan.removed} annotated images are no longer in the input (e.g. {examples}); "
            "their rows stay in the output",
            flush=True,
        )
    results = run_pipeline(config, run_id, plan) if len(plan.new) or plan.retry else []
    summary = summarise(run_id, plan, results, time.perf_counter() - start)
    plan.store.write_json(f"_runs/{run_id}/summary.json", summary)
    print(
        f"annotate: {summary['images']} images, {summary['faces']} faces, {summary['errors']} errors "
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
    failed = summary["shards_failed"]
    if failed:
        listed = "; ".join(f"{shard}: {error}" for shard, error in list(failed.items())[:5])
        raise ShardsFailed(
            f"{len(failed)} of {plan.todo} shards did not commit after {config.shard_attempts} attempts ({listed}); "
            "the others are committed: rerun the same command to do the rest"
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(AnnotateConfig, argv)
    try:
        run(config)
    except JobError as exc:
        print(f"annotate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except ShardsFailed as exc:
        print(f"annotate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_SHARDS_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
