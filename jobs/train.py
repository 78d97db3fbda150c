"""Fine-tune or train RetinaFace on a WIDER-format dataset with Ray Train (``TorchTrainer``).

Run locally (starts a local Ray)::

    python -m jobs.train --train s3://bucket/widerface/train/ --val s3://bucket/widerface/val/ \\
        --val-gt s3://bucket/widerface/ground_truth/ --storage s3://bucket/runs --name wf-2026-11 \\
        --registry s3://bucket/models/retinaface

or on a cluster::

    ray job submit --working-dir . -- python -m jobs.train --num-workers 8 --use-gpu ...

Rank 0 prints a progress line every ``--progress-every`` steps and one per epoch. Every epoch
each worker reports the loss components, learning rate and images/s (rank 0 adds the val AP);
rank 0 checkpoints model, optimizer, scheduler and epoch under ``STORAGE/NAME/``. Running again
with the same ``--name`` and ``--storage`` resumes from the latest checkpoint (Ctrl-C prints that
command); ``--max-failures`` restarts the worker group from it after a crash. At the end the
final model is registered under ``--registry`` (and promoted with ``--promote`` if it passes the
gate). Fine-tuning from a checkpoint (any ``--init`` but ``scratch``) defaults to frozen
BatchNorm, a small learning rate and no targets below the smallest anchors. Exit status: see
:mod:`jobs._exit`. See ``docs/train.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import posixpath
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.utils.data import DataLoader

from retinaface_core.augment import TrainAugment
from retinaface_core.config import RetinaFaceConfig, get_config
from retinaface_core.model import RetinaFace
from retinaface_core.registry import ModelRegistry, RegistryError, resolve_model, validation_record
from retinaface_core.storage import S3_PROTOCOLS, StorageOptions, filesystem
from retinaface_core.training import (
    EpochStats,
    Schedule,
    WiderDataset,
    WiderTrainDataset,
    collate_faces,
    freeze_batchnorm,
    ground_truth_from_dataset,
    make_optimizer,
    model_checkpoint_bytes,
    open_wider_dataset,
    train_one_epoch,
    validate,
    validation_fingerprint,
)
from retinaface_core.weights import CheckpointError, load_weights
from retinaface_core.widerface import LEVELS, WiderValGroundTruth, read_ground_truth_mat

from ._cluster import init_ray
from ._config import config_dict, format_config, parse_config
from ._exit import ExitCode, JobError

# Progress goes through logging, not print: Ray Train workers echo a print twice (their stdout
# and the root logger), a log record once.
log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pth"
CONFIG_FILE = "train_config.json"
# From scratch as the reference (batch 32). Fine-tuning a converged checkpoint wants far smaller
# steps, and no targets below the smallest anchors (10 px) whose forced matches pull the model
# off its optimum: measured in docs/train.md (benchmarks/bench_finetune.py).
SCRATCH_LR = 1e-3
FINETUNE_LR = 5e-5
SCRATCH_MIN_FACE = 2.0
FINETUNE_MIN_FACE = 8.0
RAY_DEFAULT_STORAGE = "~/ray_results"  # where Ray Train puts runs without --storage


@dataclass
class TrainConfig:
    """Train RetinaFace on a WIDER-format dataset with Ray Train."""

    train: str = field(metadata={"help": "training dataset URI: a folder with images/ and label.txt or *bbx_gt.txt, or the annotation file"})
    val: str | None = field(default=None, metadata={"help": "validation dataset URI (same layout); val AP is computed every epoch when given"})
    val_gt: str | None = field(default=None, metadata={"help": "folder of the official wider_face_val.mat and wider_{easy,medium,hard}_val.mat (default: every val face counts at every level)"})
    val_scale: str = field(default="long:640", metadata={"help": "detector input scale for validation"})
    init: str = field(default="mobilenet0.25-1mb", metadata={"help": "starting weights: a checkpoint name, path or URI, a model registry URI (its current version) or REGISTRY/vNNNN, or 'scratch'"})
    arch: str | None = field(default=None, metadata={"help": "RetinaFace config name (default: the init checkpoint's; mobilenet0.25-1mb from scratch)"})
    train_size: int | None = field(default=None, metadata={"help": "side of the square training crops (default: the config's train_size)"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    loader_workers: int = field(default=2, metadata={"help": "DataLoader processes per worker that decode and augment ahead of the step"})
    epochs: int = field(default=10, metadata={"help": "passes over the training data"})
    batch_size: int = field(default=8, metadata={"help": "images per step per worker"})
    lr: float | None = field(default=None, metadata={"help": f"peak learning rate (default: {SCRATCH_LR:g} from scratch, {FINETUNE_LR:g} fine-tuning from --init)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay (not on BatchNorm parameters and biases)"})
    warmup_epochs: float = field(default=1.0, metadata={"help": "epochs of linear learning-rate warm-up"})
    schedule: str = field(default="step", metadata={"help": "decay after warm-up", "choices": ["step", "cosine"]})
    box_weight: float = field(default=2.0, metadata={"help": "lambda1: weight of the box regression loss"})
    landmark_weight: float = field(default=1.0, metadata={"help": "lambda2: weight of the landmark regression loss"})
    min_face_size: float | None = field(default=None, metadata={"help": f"drop faces smaller than this many pixels after resizing (default: {SCRATCH_MIN_FACE:g} from scratch, {FINETUNE_MIN_FACE:g} fine-tuning from --init)"})
    freeze_bn: bool | None = field(default=None, metadata={"help": "freeze BatchNorm: running statistics and affine parameters (default: on when fine-tuning from --init, off from scratch)"})
    augment: bool = field(default=True, metadata={"help": "random crop, photometric distortion, mirror; --no-augment only resizes (an overfitting sanity check)"})
    seed: int = field(default=0, metadata={"help": "augmentation and shuffling seed"})
    storage: str | None = field(default=None, metadata={"help": "checkpoint storage URI shared by all nodes (default: Ray's ~/ray_results)"})
    name: str | None = field(default=None, metadata={"help": "run name; a rerun with the same name and storage resumes (default: retinaface-<time>)"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the latest checkpoint before the run fails"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in storage"})
    registry: str | None = field(default=None, metadata={"help": "model registry URI to register the final model in"})
    promote: bool = field(default=False, metadata={"help": "promote the registered model if its val AP is not lower on any level"})
    s3: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})
    progress_every: int = field(default=10, metadata={"help": "print a progress line every N steps of rank 0 (0: only one per epoch)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join: auto, host:port, ray://... (default: $RAY_ADDRESS, else a new local Ray)"})

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = "retinaface-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        # Resolved here so that the printed and stored settings say what the run used.
        if self.lr is None:
            self.lr = FINETUNE_LR if self.fine_tuning else SCRATCH_LR
        if self.min_face_size is None:
            self.min_face_size = FINETUNE_MIN_FACE if self.fine_tuning else SCRATCH_MIN_FACE
        if self.freeze_bn is None:
            self.freeze_bn = self.fine_tuning

    @property
    def fine_tuning(self) -> bool:
        return self.init != "scratch"


def resolve_init(cfg: TrainConfig) -> str | None:
    """The checkpoint ``--init`` names (None for scratch), checked on the driver by loading it.

    A registry resolves to its current version here, once, so every worker (and every restart)
    starts from the same weights. A bad ``--init`` is a :class:`JobError` before any worker
    starts: Ray Train's ``FailureConfig`` would otherwise retry a mistake that cannot heal.
    """
    if not cfg.fine_tuning:
        return None
    try:
        checkpoint, _ = resolve_model(cfg.init, cfg.s3)
        load_weights(checkpoint, config=cfg.arch, storage=cfg.s3)
    except (CheckpointError, RegistryError, OSError) as exc:
        raise JobError(f"--init {cfg.init}: {exc}") from exc
    return checkpoint


def _initial_model(cfg: TrainConfig, checkpoint: str | None) -> tuple[RetinaFace, RetinaFaceConfig]:
    if checkpoint is None:
        config = get_config(cfg.arch or "mobilenet0.25-1mb")
        return RetinaFace(config), config
    loaded = load_weights(checkpoint, config=cfg.arch, storage=cfg.s3)
    return loaded.model, loaded.config


def _unwrap(model: torch.nn.Module) -> RetinaFace:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker training loop that ``TorchTrainer`` runs (rank 0 also validates and checkpoints).

    ``loop_config["train"]`` is the run's :class:`TrainConfig`, ``loop_config["init"]`` the
    checkpoint :func:`resolve_init` found (None: from scratch; absent: resolved here).
    """
    cfg: TrainConfig = loop_config["train"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    init = loop_config["init"] if "init" in loop_config else resolve_init(cfg)
    model, config = _initial_model(cfg, init)
    model.train()
    if cfg.freeze_bn:
        # Before DDP wraps the model, so that it never waits for gradients these will not get.
        freeze_batchnorm(model)
    size = cfg.train_size or config.train_size
    dataset = WiderTrainDataset(
        open_wider_dataset(cfg.train, storage=cfg.s3),
        TrainAugment(
            size=size,
            mean_bgr=config.mean_bgr,
            min_face_size=cfg.min_face_size,
            crop=cfg.augment,
            photometric=cfg.augment,
            mirror_probability=0.5 if cfg.augment else 0.0,
            random_interpolation=cfg.augment,
        ),
        seed=cfg.seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        # Uneven last batches skew BatchNorm; a dataset smaller than one batch per worker keeps its one.
        drop_last=len(dataset) >= cfg.batch_size * world,
        num_workers=cfg.loader_workers,
        collate_fn=collate_faces,
        prefetch_factor=2 if cfg.loader_workers else None,
    )
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    steps_per_epoch = len(loader)

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        # Before wrapping, so that the keys never carry DDP's "module." prefix.
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)
    # Built after the model moved to its device, so that restored momentum lands there too.
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    schedule = Schedule(
        total_steps=steps_per_epoch * cfg.epochs, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), kind=cfg.schedule
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1

    validation = _validation_data(cfg) if rank == 0 and cfg.val else None
    progress = Progress(cfg.epochs, steps_per_epoch, cfg.progress_every, world) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        if world > 1:
            loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step
        local = train_one_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            config,
            device,
            box_weight=cfg.box_weight,
            landmark_weight=cfg.landmark_weight,
            freeze_batchnorm=cfg.freeze_bn,
            on_step=progress.step_callback(epoch) if progress else None,
        )
        metrics = _epoch_metrics(local, world, epoch, start_epoch, lr)
        if rank != 0:
            ray.train.report(metrics)
            continue
        network = _unwrap(model)
        if validation is not None:
            val_dataset, ground_truth = validation
            metrics["val_ap"] = validate(network, config, val_dataset, ground_truth, scale=cfg.val_scale, device=device)
            metrics["val_data"] = validation_fingerprint(val_dataset, ground_truth)
        log.info(progress.epoch_line(metrics))
        with tempfile.TemporaryDirectory() as folder:
            _write_checkpoint(Path(folder), network, optimizer, scheduler, epoch, cfg, metrics)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _format_duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def _format_losses(losses: dict[str, float]) -> str:
    return f"loss {losses['total']:.3f} (cls {losses['cls']:.3f} box {losses['box']:.3f} landmark {losses['landmark']:.3f})"


@dataclass
class Progress:
    """Rank 0's plain progress lines: every ``every`` steps within an epoch, and one per epoch.

    Images/s and the ETA extrapolate rank 0's own pace to all ``world`` workers (they run in
    lockstep under DDP); the ETA leaves out validation.
    """

    epochs: int
    steps_per_epoch: int
    every: int
    world: int

    def step_callback(self, epoch: int) -> Callable[[EpochStats], None] | None:
        if self.every <= 0:
            return None

        def report(stats: EpochStats) -> None:
            if stats.steps % self.every and stats.steps != self.steps_per_epoch:
                return
            per_step = stats.seconds / stats.steps
            remaining = (self.epochs - epoch) * self.steps_per_epoch - stats.steps
            losses = {name: total / max(stats.images, 1) for name, total in stats.loss_sums.items()}
            log.info(
                f"epoch {epoch + 1}/{self.epochs} step {stats.steps}/{self.steps_per_epoch} {_format_losses(losses)} "
                f"{stats.images * self.world / stats.seconds:.1f} img/s ETA {_format_duration(remaining * per_step)}"
            )

        return report

    def epoch_line(self, metrics: dict[str, Any]) -> str:
        losses = {name: metrics[f"loss_{name}"] for name in ("total", "cls", "box", "landmark")}
        line = (
            f"epoch {metrics['epoch'] + 1}/{self.epochs} done: {_format_losses(losses)} lr {metrics['lr']:.2e} "
            f"{metrics['images_per_second']:.1f} img/s in {_format_duration(metrics['epoch_seconds'])}"
        )
        if "val_ap" in metrics:
            line += ", val AP easy/medium/hard " + " / ".join(f"{metrics['val_ap'][level]:.4f}" for level in LEVELS)
        return line


def _validation_data(cfg: TrainConfig) -> tuple[WiderDataset, WiderValGroundTruth]:
    dataset = open_wider_dataset(cfg.val, storage=cfg.s3)
    ground_truth = read_ground_truth_mat(cfg.val_gt, cfg.s3) if cfg.val_gt else ground_truth_from_dataset(dataset)
    return dataset, ground_truth


def _epoch_metrics(local: EpochStats, world: int, epoch: int, start_epoch: int, lr: float) -> dict[str, Any]:
    """Loss per image averaged over all workers; throughput summed over workers (per worker too)."""
    totals = local.as_vector()
    if world > 1:
        dist.all_reduce(totals)
    stats = EpochStats.from_vector(totals)
    images = max(stats.images, 1)
    mean_seconds = stats.seconds / world
    return {
        "epoch": epoch,
        "resumed_from_epoch": start_epoch,
        "lr": lr,
        **{f"loss_{name}": value / images for name, value in stats.loss_sums.items()},
        "positives_per_image": stats.positives / images,
        "images": stats.images,
        "steps_per_worker": stats.steps // world,
        "images_per_second": stats.images / mean_seconds if mean_seconds else 0.0,
        "images_per_second_per_worker": stats.images / world / mean_seconds if mean_seconds else 0.0,
        "data_wait_share": stats.data_seconds / stats.seconds if stats.seconds else 0.0,
        "epoch_seconds": mean_seconds,
    }


def _write_checkpoint(
    folder: Path,
    model: RetinaFace,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    cfg: TrainConfig,
    metrics: dict[str, Any],
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": model.config.to_dict(),
    }
    torch.save(state, folder / STATE_FILE)
    (folder / MODEL_FILE).write_bytes(model_checkpoint_bytes(model))
    (folder / CONFIG_FILE).write_text(json.dumps({"train": config_dict(cfg), "model": model.config.to_dict()}, indent=2))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


def storage_filesystem(cfg: TrainConfig) -> tuple[str | None, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig from ``--storage``.

    S3 with any ``--s3-*`` setting gets a pyarrow S3 filesystem configured with them; other URIs
    pyarrow does not know (memory://, any fsspec-only protocol) go through fsspec.
    """
    if cfg.storage is None:
        return None, None
    protocol = fsspec.utils.get_protocol(cfg.storage)
    if protocol in S3_PROTOCOLS and cfg.s3 != StorageOptions():
        fs = pyarrow.fs.S3FileSystem(
            endpoint_override=cfg.s3.endpoint_url, anonymous=cfg.s3.anonymous, region=cfg.s3.region
        )
        return cfg.storage.split("://", 1)[1], fs
    if protocol in ("file", "local", *S3_PROTOCOLS, "gs", "gcs", "hdfs", "abfs", "abfss"):
        return cfg.storage, None
    fs, path = filesystem(cfg.storage, cfg.s3)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(
    cfg: TrainConfig, train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker, *, init: str | None = None
) -> TorchTrainer:
    """The ``TorchTrainer`` of a run; ``train_loop`` is replaceable (tests inject failures with it).

    ``init`` is :func:`resolve_init`'s checkpoint; without it each worker resolves ``--init`` itself.
    """
    storage_path, storage_fs = storage_filesystem(cfg)
    loop_config: dict[str, Any] = {"train": cfg}
    if init is not None or not cfg.fine_tuning:
        loop_config["init"] = init
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )


def register_result(cfg: TrainConfig, checkpoint: Checkpoint) -> dict[str, Any]:
    """Register the run's final model under ``--registry`` (and promote it with ``--promote``).

    A rerun of a finished run finds its weights already registered and reuses that version.
    """
    with checkpoint.as_directory() as folder:
        model_bytes = (Path(folder) / MODEL_FILE).read_bytes()
        stored = json.loads((Path(folder) / CONFIG_FILE).read_text())
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    if "val_ap" in metrics:
        metrics["val"] = validation_record(
            metrics["val_ap"],
            val=cfg.val,
            val_gt=cfg.val_gt,
            scale=cfg.val_scale,
            fingerprint=metrics.get("val_data"),
            storage=cfg.s3,
        )
    registry = ModelRegistry(cfg.registry, cfg.s3)
    before = set(registry.versions())
    entry = registry.register(
        model_bytes,
        config=stored,
        metrics=metrics,
        train_data={"train": cfg.train, "val": cfg.val, "val_gt": cfg.val_gt, "init": cfg.init, "run": cfg.name},
    )
    outcome: dict[str, Any] = {
        "version": entry.version,
        "uri": entry.uri,
        "sha256": entry.sha256,
        "new": entry.version not in before,
    }
    if cfg.promote:
        decision = registry.promote(entry.version)
        outcome.update(promoted=decision.promoted, promotion_reason=decision.reason)
    return outcome


def run_uri(cfg: TrainConfig) -> str:
    """Where the run's checkpoints are, as a URI ``--init`` and ``--checkpoint`` accept."""
    root = cfg.storage.rstrip("/") if cfg.storage else str(Path(RAY_DEFAULT_STORAGE).expanduser())
    return posixpath.join(root, cfg.name)


def prune_checkpoints(cfg: TrainConfig, result: ray.train.Result | None = None) -> list[str]:
    """Delete the run's checkpoint folders that Ray Train does not keep; returns their names.

    An interrupted or killed run can leave the folders of checkpoints it uploaded but never
    committed; Ray Train's ``num_to_keep`` only ever deletes committed ones, and a rerun resumes
    from committed ones only. ``result`` is the run's (after ``fit``); without it, what storage
    says, and with nothing committed there every checkpoint folder is unfinished. Call it only
    while the run is not running.
    """
    storage_path, storage_fs = storage_filesystem(cfg)
    run_path = posixpath.join(storage_path or str(Path(RAY_DEFAULT_STORAGE).expanduser()), cfg.name)
    if result is None:
        try:
            result = ray.train.Result.from_path(run_path, storage_filesystem=storage_fs)
        except RuntimeError:
            pass  # no run folder, or no checkpoint committed yet
    if result is not None:
        fs, folder = result.filesystem, result.path
        keep = {posixpath.basename(checkpoint.path) for checkpoint, _ in result.best_checkpoints or []}
    else:
        fs, folder = (storage_fs, run_path) if storage_fs else pyarrow.fs.FileSystem.from_uri(run_path)
        keep = set()
    stale = [
        info
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_") and info.base_name not in keep
    ]
    for info in stale:
        fs.delete_dir(info.path)
    return [info.base_name for info in stale]


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run, then register its final model; returns a summary.

    Raises :class:`JobError` for a bad ``--init`` before anything starts (Ray included).
    """
    init = resolve_init(cfg)
    init_ray(cfg.ray_address)
    try:
        result = build_trainer(cfg, init=init).fit()
    except SystemExit as exc:
        # Ray Train's own SIGINT handler aborts the run gracefully, then exits with status 0,
        # which would tell a scheduler that the run succeeded.
        raise KeyboardInterrupt from exc
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.name} finished without a checkpoint")
    pruned = prune_checkpoints(cfg, result)
    summary: dict[str, Any] = {
        "run": cfg.name,
        "run_uri": run_uri(cfg),
        "checkpoint": posixpath.join(run_uri(cfg), posixpath.basename(result.checkpoint.path)),
        "metrics": result.metrics,
        "pruned_checkpoints": pruned,
    }
    if cfg.registry:
        summary["registry"] = register_result(cfg, result.checkpoint)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The end-of-run summary a person reads; every path in it loads as printed."""
    metrics = summary["metrics"]
    losses = {name: metrics[f"loss_{name}"] for name in ("total", "cls", "box", "landmark")}
    lines = [
        f"run {summary['run']}: {metrics['epoch'] + 1} epochs, last {_format_losses(losses)}",
        f"checkpoint: {summary['checkpoint']}   (--init or --checkpoint take it, or the run folder {summary['run_uri']})",
    ]
    if "val_ap" in metrics:
        lines.append("val AP easy/medium/hard: " + " / ".join(f"{metrics['val_ap'][level]:.4f}" for level in LEVELS))
    if summary.get("pruned_checkpoints"):
        lines.append(f"removed {len(summary['pruned_checkpoints'])} checkpoint folder(s) an interrupted run left behind")
    registered = summary.get("registry")
    if registered:
        verb = "registered" if registered["new"] else "already registered as"
        lines.append(f"{verb} {registered['version']}: {registered['uri']}")
        if "promoted" in registered:
            lines.append(("promoted: " if registered["promoted"] else "refused by the gate: ") + registered["promotion_reason"])
    return lines


def exit_code(summary: dict[str, Any]) -> ExitCode:
    """REFUSED when ``--promote`` was refused by the gate; OK otherwise (see :mod:`jobs._exit`)."""
    return ExitCode.REFUSED if summary.get("registry", {}).get("promoted") is False else ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(TrainConfig, argv)
    print("jobs.train settings:\n" + format_config(cfg), flush=True)
    try:
        summary = run(cfg)
    except KeyboardInterrupt:
        pruned = prune_checkpoints(cfg)
        print(
            f"\ninterrupted; the latest checkpoint under {run_uri(cfg)} is kept"
            + (f" ({len(pruned)} unfinished removed)" if pruned else "")
            + ". Resume with the same command:\n  python -m jobs.train " + shlex.join(argv),
            file=sys.stderr,
            flush=True,
        )
        return ExitCode.INTERRUPTED
    except (JobError, ray.train.TrainingFailedError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"train: error: {first_line}", file=sys.stderr, flush=True)
        return ExitCode.FAILED
    print("\n".join(summary_lines(summary)), flush=True)
    return exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
