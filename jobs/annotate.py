"""Annotate every face in a set of images: object storage -> Ray actor pool -> Parquet, exactly once.

Run locally (starts a local Ray)::

    python -m jobs.annotate --input s3://bucket/photos/ --output s3://bucket/faces/

or on a cluster::

    ray job submit --working-dir . -- python -m jobs.annotate --input ... --output ...

The input is listed and cut into shards on the driver; shards already committed under the
output are skipped; the rest stream through a Ray Data actor pool, each shard becoming one
Parquet object whose write is its commit. See ``docs/annotate.md`` for the flags, the output
layout and the queries.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from retinaface_core import DetectorSettings, StorageOptions
from retinaface_core.image_io import DEFAULT_MAX_PIXELS
from schemas.annotation import SCHEMA_VERSION

from ._cluster import init_ray, pool_size
from ._config import config_dict, format_config, parse_config
from ._model import ModelIdentity, resolve_model_identity
from ._storage import JobError, OutputStore, Shard, list_input, make_shards


@dataclass
class AnnotateConfig:
    """Detect faces with landmarks and quality scores in images under a URI prefix or in a manifest."""

    input: str = field(metadata={"help": "URI prefix listed recursively for images, or a manifest (.txt/.lst/.csv one URI per line, or .parquet with a 'uri' column)"})
    output: str = field(metadata={"help": "output dataset URI (local path, file://, s3://, ...)"})
    images_per_shard: int = field(default=64, metadata={"help": "images per shard, the unit of work and of commit"})
    detector: DetectorSettings = field(default_factory=lambda: DetectorSettings(scale="long:640"), metadata={"flatten": ""})
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "images with more pixels become error rows (decompression bombs)"})
    actors: int | None = field(default=None, metadata={"help": "detector actors (default: one per GPU with --num-gpus-per-actor, else one per --num-cpus-per-actor CPUs of the cluster)"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    num_gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per detector actor (0: CPU)"})
    num_cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per detector actor"})
    decode: str = field(default="auto", metadata={"help": "where images are decoded: actor (thread pool in the detector actor), tasks (separate CPU tasks), auto (tasks with GPUs, else actor)", "choices": ["auto", "actor", "tasks"]})
    decode_threads: int = field(default=2, metadata={"help": "decode threads per actor (--decode actor)"})
    decode_cpus: float = field(default=0.5, metadata={"help": "CPUs per decode task (--decode tasks)"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads per actor (default: --num-cpus-per-actor, at least 1)"})
    overwrite: bool = field(default=False, metadata={"help": "delete previous results under --output and start over"})
    s3: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join: auto, host:port, ray://... (default: $RAY_ADDRESS, else a new local Ray)"})
    run_id: str | None = field(default=None, metadata={"help": "id recorded in every row of this run (default: time + random suffix)"})

    @property
    def decode_mode(self) -> str:
        if self.decode != "auto":
            return self.decode
        return "tasks" if self.num_gpus_per_actor > 0 else "actor"

    @property
    def threads_per_actor(self) -> int:
        return self.torch_threads or max(1, round(self.num_cpus_per_actor))

    def fingerprint(self) -> dict:
        """The settings that change the content of a shard's rows: resuming into an output written
        with other values would mix two kinds of results in one dataset. Where the model came
        from (a name, then its path) may differ; its sha256, recorded beside these, may not."""
        detector = {k: v for k, v in dataclasses.asdict(self.detector).items() if k not in ("weights", "model")}
        return {**detector, "max_pixels": self.max_pixels, "images_per_shard": self.images_per_shard}


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def prepare(config: AnnotateConfig, run_id: str) -> tuple[OutputStore, list[Shard], list[Shard], dict, ModelIdentity]:
    """Every job-level check, before any Ray work: returns (store, all shards, shards to do,
    dataset info, the model every worker must load).

    Raises :class:`JobError` with a message naming the problem: bad settings, a checkpoint that
    cannot be found, an input that cannot be listed, an output that cannot be written, or an
    output written with other settings or from another input.
    """
    if config.batch_size < 1 or (config.actors is not None and config.actors < 1):
        raise JobError("--batch-size and --actors must be >= 1")
    if config.num_cpus_per_actor <= 0 and config.num_gpus_per_actor <= 0:
        raise JobError("an actor needs --num-cpus-per-actor > 0 or --num-gpus-per-actor > 0")
    model, _ = resolve_model_identity(config.detector, config.s3)
    store = OutputStore(config.output, config.s3)
    store.check_writable()
    uris = list_input(config.input, config.s3)
    shards = make_shards(uris, config.images_per_shard)
    if config.overwrite:
        store.clear()
    dataset = {
        "schema_version": SCHEMA_VERSION,
        "model_name": model.name,
        "model_version": model.version,
        "model_checkpoint": model.checkpoint,
        "model_sha256": model.sha256,
        **config.fingerprint(),
    }
    stored = store.read_json("_dataset.json")
    previous = stored or dataset
    # Where the checkpoint came from may differ between runs (a name, then its path); its
    # sha256 is what must not change.
    changed = sorted(k for k in dataset.keys() | previous.keys() if k != "model_checkpoint" and previous.get(k) != dataset.get(k))
    if changed:
        raise JobError(
            f"output {config.output} holds results made with other settings ({', '.join(changed)}: "
            f"{ {k: previous.get(k) for k in changed} } vs { {k: dataset.get(k) for k in changed} }); "
            "use --overwrite to start over, or another --output"
        )
    committed = store.committed_shards()
    foreign = committed - {s.id for s in shards}
    if foreign:
        # Shards are slices of the sorted listing: after the input changed, old shards would
        # hold second copies of rows that new shards also hold.
        raise JobError(
            f"output {config.output} holds {len(foreign)} committed shards that are not shards of this input "
            f"(the input changed, or another input was written here); use --overwrite, or another --output"
        )
    if stored is None:
        store.write_json("_dataset.json", dataset)
    store.write_json(f"_runs/{run_id}/config.json", {"run_id": run_id, **config_dict(config)})
    todo = [s for s in shards if s.id not in committed]
    return store, shards, todo, dataset, model


def run_pipeline(config: AnnotateConfig, run_id: str, todo: list[Shard], model: ModelIdentity) -> list[dict]:
    """Stream the shards through Ray Data; returns one summary dict per shard committed."""
    import ray

    from ._annotator import ShardAnnotator, decode_shards

    init_ray(config.ray_address)
    # An actor without a shard to work on would only load a model.
    actors = min(
        len(todo), config.actors or pool_size(ray.cluster_resources(), config.num_cpus_per_actor, config.num_gpus_per_actor)
    )
    print(f"detector actors: {actors}, torch threads per actor: {config.threads_per_actor}, decode: {config.decode_mode}", flush=True)
    # One block per shard, so that the actor pool hands shards out one at a time.
    ds = ray.data.from_items(
        [{"shard": s.id, "uris": list(s.uris)} for s in todo], override_num_blocks=len(todo)
    )
    if config.decode_mode == "tasks":
        ds = ds.map_batches(
            decode_shards,
            fn_kwargs={"storage": config.s3, "max_pixels": config.max_pixels},
            batch_size=1,
            num_cpus=config.decode_cpus,
        )
    gpus = config.num_gpus_per_actor
    ds = ds.map_batches(
        ShardAnnotator,
        fn_constructor_kwargs={"config": config, "run_id": run_id, "model": model},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=config.num_cpus_per_actor,
        num_gpus=gpus if gpus > 0 else None,
    )
    return list(ds.iter_rows())


def summarise(run_id: str, shards: list[Shard], todo: list[Shard], results: list[dict], seconds: float) -> dict:
    images = sum(int(r["images"]) for r in results)
    kinds: Counter = Counter()
    for r in results:
        kinds.update(json.loads(r["errors_by_kind"]))
    return {
        "run_id": run_id,
        "shards_total": len(shards),
        "shards_skipped_already_committed": len(shards) - len(todo),
        "shards_processed": len(results),
        "images": images,
        "faces": sum(int(r["faces"]) for r in results),
        "errors": sum(int(r["errors"]) for r in results),
        "errors_by_kind": dict(sorted(kinds.items())),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 3) if seconds > 0 else 0.0,
    }


def run(config: AnnotateConfig) -> dict:
    """Run the job; returns the summary (also written to ``_runs/<run_id>/summary.json``)."""
    run_id = config.run_id or new_run_id()
    print(f"annotate run {run_id}\n{format_config(config)}", flush=True)
    start = time.perf_counter()
    store, shards, todo, _, model = prepare(config, run_id)
    print(f"{len(shards)} shards, {len(shards) - len(todo)} already committed, {len(todo)} to do", flush=True)
    results = run_pipeline(config, run_id, todo, model) if todo else []
    missing = {s.id for s in shards} - store.committed_shards()
    if missing:
        raise JobError(f"{len(missing)} shards were not committed: {sorted(missing)[:5]}...")
    summary = summarise(run_id, shards, todo, results, time.perf_counter() - start)
    store.write_json(f"_runs/{run_id}/summary.json", summary)
    print(
        f"annotate: {summary['images']} images, {summary['faces']} faces, {summary['errors']} errors "
        f"in {summary['seconds']:.1f} s = {summary['images_per_second']:.2f} images/s; "
        f"{summary['shards_processed']} shards done, {summary['shards_skipped_already_committed']} skipped "
        f"(already committed)",
        flush=True,
    )
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(AnnotateConfig, argv)
    try:
        run(config)
    except JobError as exc:
        print(f"annotate: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
