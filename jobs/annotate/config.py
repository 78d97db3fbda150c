"""The annotation job's settings: one dataclass, its flags, and the settings that name an output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from retinaface_core import DetectorSettings, StorageOptions
from retinaface_core.align import CROP_FORMATS, JPEG_QUALITY
from retinaface_core.batching import PLAN_WINDOW_BATCHES
from retinaface_core.flags import ANNOTATION_DEFAULTS
from retinaface_core.image_io import DEFAULT_MAX_PIXELS
from schemas.crops import CROPS_SCHEMA_VERSION


@dataclass
class AnnotateConfig:
    """Detect faces with landmarks and quality scores in images under a URI prefix or in a manifest."""

    input: str = field(
        metadata={
            "help": (
                "URI prefix listed recursively for images, or a manifest (.txt/.lst/.csv one URI per line, or "
                ".parquet with a 'uri' column); with --inventory, the prefix the inventory's entries are selected "
                "under"
            )
        }
    )
    output: str = field(metadata={"help": "output dataset URI (local path, file://, s3://, ...)"})
    inventory: str | None = field(
        default=None,
        metadata={
            "help": (
                "take the input from an inventory instead of listing --input, planned with Ray Data so the driver "
                "never holds every URI (for 10^8 objects): an S3 Inventory manifest.json (CSV or Parquet) of "
                "--input's bucket, or a Parquet file or folder with a 'uri' column"
            )
        },
    )
    images_per_shard: int = field(
        default=1000,
        metadata={
            "help": "images per output file, the unit of commit (fewer when there are too few new images to give every actor a shard)"
        },
    )
    # The same defaults as the core's command line (python -m retinaface_core), so both find the same faces.
    detector: DetectorSettings = field(default_factory=lambda: ANNOTATION_DEFAULTS, metadata={"flatten": ""})
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS, metadata={"help": "images with more pixels become error rows (decompression bombs)"}
    )
    max_bytes: int = field(
        default=256 * 2**20, metadata={"help": "objects larger than this many bytes become error rows without being read whole"}
    )
    read_attempts: int = field(
        default=4,
        metadata={
            "help": (
                "reads of an object the store fails to serve (5xx, timeouts, resets, throttling) before it becomes a "
                "'storage' error row, which the next run retries"
            )
        },
    )
    shard_attempts: int = field(
        default=3, metadata={"help": "attempts at a shard whose work fails (e.g. its commit) before the run reports it failed"}
    )
    retry_backoff: float = field(
        default=1.0, metadata={"help": "seconds before the first retry of a read or a shard; doubled for each next one"}
    )
    decode_window_mb: int = field(
        default=1024,
        metadata={
            "help": (
                "decoded pixels (MiB) an actor holds ahead of the detector; with --decode-threads images being "
                "decoded, this bounds its memory"
            )
        },
    )
    actors: int | None = field(
        default=None,
        metadata={
            "help": (
                "detector actors (default: one per GPU with --num-gpus-per-actor, else one per --num-cpus-per-actor CPUs of the cluster)"
            )
        },
    )
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    num_gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per detector actor (0: CPU)"})
    num_cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per detector actor"})
    decode: str = field(
        default="auto",
        metadata={
            "help": (
                "where images are read and decoded: actor (the detector actor's reader threads; JPEGs decoded on "
                "its GPU where it has one), tasks (separate CPU tasks decode and hand over pixels), auto (actor)"
            ),
            "choices": ["auto", "actor", "tasks"],
        },
    )
    decode_threads: int = field(default=2, metadata={"help": "decode threads per actor (--decode actor)"})
    decode_cpus: float = field(default=0.5, metadata={"help": "CPUs per decode task (--decode tasks)"})
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch intra-op threads per actor (default: --num-cpus-per-actor, at least 1)"}
    )
    crops: int = field(
        default=0,
        metadata={
            "help": (
                "side (px) of the faces aligned to the ArcFace 5-point template (e.g. 112) written with each shard "
                "to the crops table; 0: no crops"
            )
        },
    )
    crop_format: str = field(
        default="jpeg",
        metadata={"help": f"encoding of the crops (jpeg at quality {JPEG_QUALITY}, or lossless png)", "choices": list(CROP_FORMATS)},
    )
    crop_min_size: float = field(
        default=32.0, metadata={"help": "crop only faces whose box's short side has at least this many pixels (--crops)"}
    )
    crop_min_quality: float = field(default=0.0, metadata={"help": "crop only faces whose quality is at least this, in [0, 1] (--crops)"})
    overwrite: bool = field(default=False, metadata={"help": "delete previous results under --output and start over"})
    add_input: bool = field(
        default=False,
        metadata={"help": "annotate --input into an --output that holds the results of another input (refused without it)"},
    )
    lease_seconds: float = field(
        default=60.0,
        metadata={
            "help": (
                "one run at a time annotates an output: the run renews its lease on it every quarter of this, and a run "
                "that finds a lease not renewed for this long (or whose process on this machine is gone) takes it over"
            )
        },
    )
    s3: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})
    ray_address: str | None = field(
        default=None, metadata={"help": "Ray cluster to join: auto, host:port, ray://... (default: $RAY_ADDRESS, else a new local Ray)"}
    )
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
        # Recorded only when on, so that outputs without crops keep the fingerprint they had before crops existed.
        crops = {"crops": self.crop_settings()} if self.crops else {}
        return {**detector, "max_pixels": self.max_pixels, "max_bytes": self.max_bytes, **crops}

    def crop_settings(self) -> dict:
        """What the crops of an output are made with (in its settings when ``--crops`` is on)."""
        return {
            "size": self.crops,
            "format": self.crop_format,
            "min_size": self.crop_min_size,
            "min_quality": self.crop_min_quality,
            "jpeg_quality": JPEG_QUALITY,
            "schema_version": CROPS_SCHEMA_VERSION,
        }
