"""Training building blocks without any distributed framework: data, schedule, one epoch, validation.

A WIDER-format dataset is a folder (local or any fsspec URI) holding ``images/EVENT/NAME.jpg``
and one annotation file: ``label.txt`` (RetinaFace, with landmarks) or ``*bbx_gt.txt`` (the
official split format). The URI may also name the annotation file itself; images are then
looked up in ``images/`` beside it.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .anchors import cached_priors
from .augment import Faces, TrainAugment
from .box_coding import box_convert
from .config import RetinaFaceConfig
from .detector import Detector
from .evaluation import evaluate
from .image_io import DEFAULT_MAX_PIXELS, read_image
from .loss import FaceTargets, LossComponents, multibox_loss
from .model import RetinaFace
from .preprocessing import to_network_input
from .storage import StorageOptions, filesystem
from .weights import LoadedWeights
from .widerface import LEVELS, WiderImage, WiderValGroundTruth, read_bbx_gt, read_label_txt, submission_rows


@dataclass(frozen=True)
class WiderDataset:
    """The annotations of a WIDER-format dataset and where its images are."""

    uri: str
    annotation_uri: str
    images_root: str
    images: list[WiderImage]
    storage: StorageOptions = field(default_factory=StorageOptions)

    def image_uri(self, image: WiderImage) -> str:
        return posixpath.join(self.images_root, image.name)

    def read_image(self, image: WiderImage) -> np.ndarray:
        """The (H, W, 3) uint8 BGR pixels of one of the dataset's images."""
        return read_image(self.image_uri(image), DEFAULT_MAX_PIXELS, self.storage)


def open_wider_dataset(uri: str, images_root: str | None = None, storage: StorageOptions | None = None) -> WiderDataset:
    """Read a WIDER-format dataset's annotations (see the module docstring for the layout).

    ``images_root`` overrides where the images are (the official release keeps its split files
    in ``wider_face_split/`` apart from ``WIDER_val/images/``).
    """
    storage = storage or StorageOptions()
    fs, path = filesystem(uri, storage)
    if fs.isfile(path):
        annotation = path
    else:
        candidates = [posixpath.join(path, "label.txt")] + sorted(fs.glob(posixpath.join(path, "*bbx_gt.txt")))
        found = [c for c in candidates if fs.isfile(c)]
        if not found:
            raise FileNotFoundError(f"{uri}: no label.txt or *bbx_gt.txt annotation file")
        annotation = found[0]
    annotation_uri = fs.unstrip_protocol(annotation) if "://" in uri else annotation
    if annotation.endswith("label.txt"):
        images = read_label_txt(annotation_uri, degenerate="drop", storage=storage)
    else:
        images = read_bbx_gt(annotation_uri, degenerate="drop", storage=storage)
    images_root = images_root or posixpath.join(posixpath.dirname(annotation_uri), "images")
    return WiderDataset(uri, annotation_uri, images_root.rstrip("/"), images, storage)


class WiderTrainDataset(Dataset):
    """Augmented training samples of a WIDER-format dataset; images without faces are skipped.

    Sample ``i`` of epoch ``e`` is augmented with a generator seeded by (seed, e, i), so an epoch
    is reproducible whatever the number of loader workers or which worker draws the sample.
    Call :meth:`set_epoch` before iterating an epoch (loader workers must not be persistent).

    Returns (image, faces): (size, size, 3) uint8 BGR tensor and :class:`Faces` in its pixels.
    """

    def __init__(self, dataset: WiderDataset, augment: TrainAugment, seed: int = 0) -> None:
        self.dataset = dataset
        self.images = [image for image in dataset.images if len(image.boxes)]
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Faces]:
        annotation = self.images[index]
        image = self.dataset.read_image(annotation)
        faces = Faces(annotation.boxes, annotation.landmarks, annotation.has_landmarks)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pixels, faces = self.augment(image, faces, rng)
        return torch.from_numpy(pixels), faces


def collate_faces(samples: Sequence[tuple[Tensor, Faces]]) -> tuple[Tensor, FaceTargets]:
    """Stack a batch: (B, S, S, 3) uint8 pixels and padded targets normalised by the side S."""
    pixels = torch.stack([s[0] for s in samples])
    height, width = pixels.shape[1:3]
    count = max([len(s[1]) for s in samples] + [1])
    boxes = torch.zeros(len(samples), count, 4)
    landmarks = torch.zeros(len(samples), count, 5, 2)
    has_landmarks = torch.zeros(len(samples), count, dtype=torch.bool)
    valid = torch.zeros(len(samples), count, dtype=torch.bool)
    scale = torch.tensor([width, height], dtype=torch.float32)
    for row, (_, faces) in enumerate(samples):
        n = len(faces)
        boxes[row, :n] = (torch.from_numpy(faces.boxes).view(n, 2, 2) / scale).view(n, 4)
        # Absent landmarks are NaN in the annotations; zeros keep masked arithmetic finite.
        landmarks[row, :n] = torch.from_numpy(np.nan_to_num(faces.landmarks)) / scale
        has_landmarks[row, :n] = torch.from_numpy(faces.has_landmarks)
        valid[row, :n] = True
    return pixels, FaceTargets(boxes, landmarks, has_landmarks, valid)


@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier per iteration: linear warm-up, then step or cosine decay.

    Attributes:
        total_steps: iterations of the whole run.
        warmup_steps: iterations of linear warm-up from ``warmup_start`` to 1.
        kind: ``"step"`` (multiply by ``gamma`` at each of ``milestones``, fractions of the run;
            the reference decays at epochs 190 and 220 of 250) or ``"cosine"`` (to 0 at the end).
    """

    total_steps: int
    warmup_steps: int = 0
    kind: str = "step"
    milestones: tuple[float, ...] = (0.76, 0.88)
    gamma: float = 0.1
    warmup_start: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.kind!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        if self.kind == "step":
            return self.gamma ** sum(step >= m * self.total_steps for m in self.milestones)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))


def model_checkpoint_bytes(model: RetinaFace) -> bytes:
    """``model`` serialised as ``{"state_dict", "config"}``, the layout :func:`weights.read_checkpoint`
    loads with its config (so ``Detector(weights="model.pth")`` needs no ``config=``)."""
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "config": model.config.to_dict()}, buffer)
    return buffer.getvalue()


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum as in the reference; no weight decay on BatchNorm parameters and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def freeze_batchnorm(model: nn.Module) -> int:
    """Stop training every BatchNorm layer's affine parameters, like torchvision's
    ``FrozenBatchNorm2d`` but keeping the layers (and so the checkpoint's keys); returns how many
    layers. :func:`train_one_epoch` with ``freeze_batchnorm=True`` also keeps their running
    statistics. Call before building the optimizer and wrapping the model in DDP."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.requires_grad_(False)
    return len(layers)


@dataclass
class EpochStats:
    """Sums over one epoch on one worker; :meth:`means` turns them into per-image metrics."""

    loss_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("total", "cls", "box", "landmark"), 0.0))
    images: int = 0
    steps: int = 0
    positives: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0

    def as_vector(self) -> Tensor:
        """Every sum in one float64 tensor, for an all-reduce across workers."""
        return torch.tensor(
            [*self.loss_sums.values(), self.images, self.steps, self.positives, self.seconds, self.data_seconds],
            dtype=torch.float64,
        )

    @classmethod
    def from_vector(cls, vector: Tensor) -> EpochStats:
        values = vector.tolist()
        names = ("total", "cls", "box", "landmark")
        return cls(dict(zip(names, values[:4])), int(values[4]), int(values[5]), int(values[6]), values[7], values[8])


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, FaceTargets]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: RetinaFaceConfig,
    device: torch.device,
    *,
    box_weight: float = 2.0,
    landmark_weight: float = 1.0,
    freeze_batchnorm: bool = False,
    on_step: Callable[[EpochStats], None] | None = None,
) -> EpochStats:
    """One pass over ``loader``; the scheduler steps every iteration.

    ``freeze_batchnorm`` normalises with the running statistics and leaves them as they are
    (see :func:`freeze_batchnorm` for the affine parameters): the usual choice when fine-tuning
    with a few images per worker, whose batch statistics are too noisy to replace the checkpoint's.
    ``on_step`` sees the sums so far after every step (``seconds`` up to date), for progress lines.
    ``data_seconds`` is the time spent blocked waiting for the next batch: with enough loader
    workers it stays near zero because batches are decoded and augmented during the step.
    """
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    stats = EpochStats()
    start = time.perf_counter()
    iterator = iter(loader)
    while True:
        wait_start = time.perf_counter()
        try:
            pixels, targets = next(iterator)
        except StopIteration:
            break
        stats.data_seconds += time.perf_counter() - wait_start
        height, width = pixels.shape[1:3]
        inputs = to_network_input(pixels.numpy(), config.mean_bgr, config.channel_order, device)
        targets = targets.to(device)
        priors = cached_priors(height, width, config.min_sizes, config.steps, str(device))
        losses: LossComponents = multibox_loss(
            model(inputs), targets, priors, config.variances, box_weight=box_weight, landmark_weight=landmark_weight
        )
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()
        scheduler.step()
        batch = pixels.shape[0]
        for name in stats.loss_sums:
            stats.loss_sums[name] += float(getattr(losses, name).detach()) * batch
        stats.images += batch
        stats.steps += 1
        stats.positives += int(losses.num_pos)
        if on_step is not None:
            stats.seconds = time.perf_counter() - start
            on_step(stats)
    stats.seconds = time.perf_counter() - start
    return stats


def ground_truth_from_dataset(dataset: WiderDataset) -> WiderValGroundTruth:
    """Evaluation ground truth from a dataset's own boxes, every face counting at every level.

    For validation sets without the official per-level lists (the three APs are then equal).
    """
    boxes = {}
    for image in dataset.images:
        boxes[_evaluation_name(image.name)] = box_convert(image.boxes.astype(np.float64), "xyxy", "xywh")
    counts = {level: {name: np.ones(len(b), bool) for name, b in boxes.items()} for level in LEVELS}
    return WiderValGroundTruth(boxes=boxes, counts=counts)


def validation_fingerprint(dataset: WiderDataset, ground_truth: WiderValGroundTruth) -> dict[str, str]:
    """sha256 of what :func:`validate` measures on: the list of images, and the ground truth of
    those images (boxes and per-level masks). Computed from content, so the same data under
    another spelling of its URI, or a copy elsewhere, fingerprints the same; an edited
    annotation does not."""
    names = sorted({_evaluation_name(image.name) for image in dataset.images} & set(ground_truth.boxes))
    evaluated = ground_truth.subset(names)
    truth = hashlib.sha256()
    for name in names:
        truth.update(name.encode() + b"\0")
        truth.update(np.ascontiguousarray(evaluated.boxes[name], dtype=np.float64).tobytes())
        for level in LEVELS:
            truth.update(np.ascontiguousarray(evaluated.counts[level][name], dtype=bool).tobytes())
    return {
        "images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "ground_truth_sha256": truth.hexdigest(),
    }


def _evaluation_name(name: str) -> str:
    return posixpath.splitext(name)[0]


def validate(
    model: RetinaFace,
    config: RetinaFaceConfig,
    dataset: WiderDataset,
    ground_truth: WiderValGroundTruth,
    *,
    scale: str = "long:640",
    score_threshold: float = 0.02,
    device: torch.device | str = "cpu",
    read_threads: int = 4,
) -> dict[str, float]:
    """WIDER FACE AP per level of ``model`` on ``dataset`` (only the images it holds).

    Runs the production :class:`Detector` (BatchNorm folded into a copy; ``model`` is left
    untouched) with the reference evaluation settings: score > 0.02, NMS 0.4, 750 kept.
    """
    loaded = LoadedWeights(model=model, config=config, name="training", uri="", sha256="")
    detector = Detector(loaded, device=device, scale=scale, score_threshold=score_threshold)
    predictions: dict[str, np.ndarray] = {}
    with ThreadPoolExecutor(read_threads) as pool:
        decoded = pool.map(dataset.read_image, dataset.images)
        for annotation, pixels in zip(dataset.images, decoded):
            found = detector.detect([pixels])[0]
            predictions[_evaluation_name(annotation.name)] = submission_rows(found.boxes, found.scores)
    return dict(evaluate(predictions, ground_truth, subset=True).ap)
