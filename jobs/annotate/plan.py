"""What a run does, decided on the driver before any annotation work: every job-level check,
then the new URIs (from a listing, compared by digest with the committed output, or from an
inventory, planned in Ray Data), the shards to redo, and the shard rows the actor pool takes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

from retinaface_core.align import MAX_CROP_SIZE, MIN_CROP_SIZE
from retinaface_core.quality import QUALITY_MODEL_VERSION
from retinaface_core.storage import canonical_uri, redact
from schemas.annotation import SCHEMA_VERSION

from .._cluster import init_ray
from .._config import config_dict
from .._exit import JobError
from .._inputs import Listing, SkipCounts, list_input
from .._model import ModelIdentity, resolve_model_identity
from .config import AnnotateConfig
from .digests import DigestSet, uri_digests
from .inventory import Inventory, open_inventory, plan_inventory, union
from .lease import RunLease
from .output import OutputListing, OutputStore, UnreadableShard, settings_fingerprint
from .shards import Shard, make_shards, shard_table

if TYPE_CHECKING:
    import ray.data


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

    ``objects`` is what the input names, of which ``listed`` are images and ``skipped`` the rest
    (by reason); ``new`` are the listed URIs that no committed shard holds, ``retry`` the
    committed shards to redo for their storage errors (id -> their URIs), ``removed`` the count
    of committed URIs the input no longer has (reported, kept; ``removed_examples`` up to 3 of
    them), ``inputs`` every input the output holds results of, ``todo`` the count of shards to
    do once they are cut. ``lease`` is the run's hold on the output (released by the job at its
    end), ``quarantined`` the files moved out of ``annotations/``.
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
    objects: int = 0
    skipped: SkipCounts = field(default_factory=SkipCounts)
    inputs: list[str] = field(default_factory=list)
    todo: int = 0
    lease: RunLease | None = None
    quarantined: list[str] = field(default_factory=list)


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


def comparable(settings: dict) -> dict:
    """``settings`` less where the checkpoint came from and the inputs: what two runs into one
    output must share."""
    return {k: v for k, v in settings.items() if k not in ("model_checkpoint", INPUTS)}


INPUTS = "inputs"
"""The key of ``_dataset.json`` listing the inputs (canonical ``--input`` URIs) the output holds results of."""


def check_settings(output: str, stored: dict | None, settings: dict) -> None:
    """Refuse an output whose ``_dataset.json`` holds ``stored`` settings (None: none yet) other than this run's."""
    if stored is None:
        return
    changed = sorted(k for k in comparable(settings).keys() | comparable(stored).keys() if stored.get(k) != settings.get(k))
    if changed:
        differences = "; ".join(f"{k}: {stored.get(k)!r} in the output, {settings.get(k)!r} requested" for k in changed)
        raise JobError(
            f"output {output} holds results made with other settings ({differences}; stored in {output}/{OutputStore.DATASET}); "
            "use --overwrite to start over, or another --output"
        )


def check_input(output: str, stored: dict, input_uri: str, add: bool) -> list[str]:
    """The inputs the output will hold results of, ``input_uri`` among them (to record if new):
    another input than those ``stored`` is refused unless ``add`` (``--add-input``). An output
    of a version that did not record its inputs takes this one."""
    inputs = list(stored.get(INPUTS) or [])
    if inputs and input_uri not in inputs and not add:
        raise JobError(
            f"output {output} holds the results of another input ({', '.join(inputs)}), not of {input_uri}: "
            "give --add-input to annotate this input into it as well, or another --output (--overwrite starts over)"
        )
    return inputs if input_uri in inputs else [*inputs, input_uri]


def prepare(config: AnnotateConfig, run_id: str) -> Plan:
    """Every job-level check, then the plan: on the driver from a listing, or in Ray Data from
    an inventory (``--inventory``; its files are checked before any Ray work). The plan holds
    the output's lease (:class:`RunLease`): a run that finds another one annotating the output
    says so and waits for it.

    Raises :class:`JobError` with a message naming the problem: bad settings, a checkpoint that
    cannot be found, an input that cannot be listed, an inventory that cannot be read, an output
    that cannot be written, or an output written with other settings (by an earlier run, by a
    concurrent one, or found in a shard's own name). A refused run writes nothing.
    """
    check_config(config)
    model, _ = resolve_model_identity(config.detector, config.s3)
    store = OutputStore(config.output, config.s3)
    store.check_writable()
    inventory = open_inventory(config.inventory, config.input, config.s3) if config.inventory else None
    named = None if inventory else list_input(config.input, config.s3)
    settings = output_settings(config, model)
    if not config.overwrite:
        # At once, rather than after waiting for a run of other settings to end (checked again below).
        check_settings(config.output, store.read_json(OutputStore.DATASET), settings)
    try:
        lease = RunLease.acquire(store, run_id, config.lease_seconds)
    except Exception as exc:
        raise JobError(f"output {config.output}: cannot take its lease ({type(exc).__name__}: {exc})") from exc
    try:
        return _plan_holding(config, run_id, store, lease, inventory, named, settings, model)
    except BaseException:
        lease.release()
        raise


def check_config(config: AnnotateConfig) -> None:
    """:class:`JobError` for settings out of range, before anything is read."""
    if config.batch_size < 1 or (config.actors is not None and config.actors < 1):
        raise JobError("--batch-size and --actors must be >= 1")
    if config.num_cpus_per_actor <= 0 and config.num_gpus_per_actor <= 0:
        raise JobError("an actor needs --num-cpus-per-actor > 0 or --num-gpus-per-actor > 0")
    counts = (config.images_per_shard, config.read_attempts, config.shard_attempts, config.max_bytes)
    if min(*counts, config.decode_window_mb, config.decode_threads) < 1:
        raise JobError(
            "--images-per-shard, --read-attempts, --shard-attempts, --max-bytes, --decode-window-mb and --decode-threads must be >= 1"
        )
    if not config.lease_seconds > 0:
        raise JobError(f"--lease-seconds must be > 0, got {config.lease_seconds}")
    if config.crops and not (MIN_CROP_SIZE <= config.crops <= MAX_CROP_SIZE):
        raise JobError(f"--crops must be 0 (no crops) or a side in [{MIN_CROP_SIZE}, {MAX_CROP_SIZE}] px, got {config.crops}")
    if config.crop_min_size < 0 or not 0 <= config.crop_min_quality <= 1:
        raise JobError(
            f"--crop-min-size must be >= 0 and --crop-min-quality in [0, 1], got {config.crop_min_size}, {config.crop_min_quality}"
        )


def _plan_holding(
    config: AnnotateConfig,
    run_id: str,
    store: OutputStore,
    lease: RunLease,
    inventory: Inventory | None,
    named: Listing | None,
    settings: dict,
    model: ModelIdentity,
) -> Plan:
    """:func:`prepare` once the run holds the output: nothing is written before every check passed."""
    if config.overwrite:
        store.clear()
    listing = store.listing()
    stored = store.read_json(OutputStore.DATASET)
    input_uri = redact(canonical_uri(config.input, config.s3))
    inputs = [input_uri]
    if stored is not None:
        check_settings(config.output, stored, settings)
        inputs = check_input(config.output, stored, input_uri, config.add_input)
    check_shards(config.output, store, settings, listing.committed)
    # The first run whose settings pass owns the output; a writer that holds no lease (an older
    # version of the job) may have created it meanwhile, and is compared with once more.
    if stored is None and not store.create_json(OutputStore.DATASET, {**settings, INPUTS: inputs}):
        stored = store.read_json(OutputStore.DATASET) or {}
        check_settings(config.output, stored, settings)
        inputs = check_input(config.output, stored, input_uri, config.add_input)
    quarantined = clean_up(store, listing, run_id)
    # Crops objects of shards that never committed (their attempt died between the two writes) are
    # no part of the output; a redo of the same shard would replace them, another cut would not.
    store.remove_crops(listing.orphan_crops())
    committed = dict(listing.committed)
    # What is already annotated comes from the output itself (its uri column), so a grown input
    # gets only its new objects annotated, in new shards, and no URI is ever annotated twice.
    new: NewImages
    if inventory is not None:
        init_ray(config.ray_address)
        paths = {store.shard_path(s, fp): s for s, fp in sorted(committed.items())}
        found = plan_inventory(inventory, list(paths), store.fs)
        for path, why in found.unreadable:
            quarantined.append(quarantine(store, path, why, run_id, "its images are annotated again"))
            del committed[paths[path]]
        listed, new, removed, examples = found.listed, found.new, found.removed, found.removed_examples
        objects, skipped = found.objects, found.skipped
    else:
        assert named is not None
        listed, objects, skipped = len(named.uris), named.objects, named.skipped
        new, removed, examples = split_listing(named.uris, readable_uris(store, committed, run_id, quarantined))
        del named  # the new ones are what the run keeps
    retry_ids = sorted(listing.retry & committed.keys())
    retry = {shard: store.read_uris({shard: committed[shard]}).to_pylist() for shard in retry_ids}
    if stored is not None and inputs != stored.get(INPUTS):
        store.write_json(OutputStore.DATASET, {**stored, INPUTS: inputs})
    store.write_json(f"_runs/{run_id}/config.json", {"run_id": run_id, **config_dict(config)})
    return Plan(
        store, listed, len(committed), new, retry, removed, examples, settings, model, objects, skipped, inputs,
        lease=lease, quarantined=quarantined,
    )  # fmt: skip


def check_shards(output: str, store: OutputStore, settings: dict, committed: dict[str, str]) -> None:
    """Refuse an output holding committed shards whose names say other settings than ``settings``."""
    fingerprint = settings_fingerprint(comparable(settings))
    mixed = {shard: fp for shard, fp in committed.items() if fp != fingerprint}
    if not mixed:
        return
    shard, fp = next(iter(sorted(mixed.items())))
    try:
        found = store.read_settings(shard, fp) or "written by an older version"
    except Exception as exc:
        found = f"not readable ({type(exc).__name__}: {exc})"
    raise JobError(
        f"output {output} holds {len(mixed)} committed shards made with other settings than this run's "
        f"(e.g. shard {shard}: {found}); use --overwrite to start over, or another --output"
    )


def clean_up(store: OutputStore, listing: OutputListing, run_id: str) -> list[str]:
    """Remove the temporary files of writes that never completed (the run holds the output, so no
    write of another run is under way) and quarantine the files under ``annotations/`` that are
    not shard objects (dataset readers would fail on them); returns the quarantined URIs."""
    for path in listing.temporaries:
        store.fs.rm_file(path)
    if listing.temporaries:
        print(
            f"annotate: removed {len(listing.temporaries)} temporary files of writes that never completed "
            f"(e.g. {store.describe(listing.temporaries[0])})",
            flush=True,
        )
    return [
        quarantine(store, path, "not a shard object of this job", run_id, "readers of annotations/ would fail on it")
        for path in listing.foreign
    ]


def quarantine(store: OutputStore, path: str, why: str, run_id: str, consequence: str) -> str:
    """Move ``path`` under ``_quarantine/<run_id>/``, saying so; returns its URI before the move."""
    where = store.quarantine(path, run_id)
    print(f"annotate: warning: {store.describe(path)}: {why}; moved to {where}, kept for inspection; {consequence}", flush=True)
    return store.describe(path)


def readable_uris(store: OutputStore, committed: dict[str, str], run_id: str, quarantined: list[str]) -> Iterator[pa.Array]:
    """The ``uri`` column of each committed shard; a shard object that is not readable is
    quarantined and dropped from ``committed`` (its URIs are then new, and annotated again)."""
    for shard, fp, uris in store.shard_uris(dict(committed)):
        if isinstance(uris, UnreadableShard):
            quarantined.append(quarantine(store, store.shard_path(shard, fp), str(uris), run_id, "its images are annotated again"))
            del committed[shard]
        else:
            yield uris


# Committed URIs looked up at once: enough that the sorted queries walk the listing's digests
# in order, few enough that a round's strings stay small beside the listing's digests.
LOOKUP_ROWS = 1 << 18


def split_listing(uris: pa.ChunkedArray, committed: Iterable[pa.Array]) -> tuple[ListedImages, int, list[str]]:
    """The listed URIs (each once) that no committed shard holds, and how many committed URIs
    are no longer listed, with up to 3 of them; ``committed`` are the ``uri`` columns of the
    committed shards (:meth:`OutputStore.uri_batches`, :func:`readable_uris`).

    Compared by digest (:class:`DigestSet`): the listing's digests are kept (24 B per URI, 40
    at the peak while they are sorted) and the committed ``uri`` columns are streamed past them
    ``LOOKUP_ROWS`` at a time, so the committed URIs are never all held, nor copied into a hash
    set as Arrow's ``is_in`` would (``docs/annotate.md``, "Scale notes and limits", has the
    driver memory of both, from ``benchmarks/bench_plan.py``).
    """
    listed = DigestSet(uri_digests(uris))
    annotated = np.zeros(len(uris), bool)
    removed, examples = 0, list[str]()
    for done, digests in _lookup_rounds(committed):
        found = listed.find(digests)
        annotated[found[found >= 0]] = True
        missing = found < 0
        removed += int(missing.sum())
        examples += done.filter(pa.array(missing))[: 3 - len(examples)].to_pylist()
    del listed
    new = uris.filter(pa.array(~annotated)) if annotated.any() else uris
    return ListedImages(new), removed, examples


def _lookup_rounds(batches: Iterable[pa.Array]) -> Iterator[tuple[pa.ChunkedArray, np.ndarray]]:
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
    parts = (
        [ray.data.from_arrow([shard_table([Shard(shard, uris)], retry=True) for shard, uris in plan.retry.items()])] if plan.retry else []
    )
    new = plan.new.shard_rows(size)
    if new is not None:
        parts.append(new)
    plan.todo = sum(part.count() for part in parts)
    return union(parts)
