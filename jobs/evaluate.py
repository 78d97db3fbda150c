"""WIDER FACE val evaluation as a Ray job: detect on a val image folder, write predictions and AP.

    python -m jobs.evaluate --images s3://bucket/WIDER_val/images/ \\
        --ground-truth s3://bucket/wider_face_split/ --output s3://bucket/eval/run1/ --scale long:640

The image folder has the official layout (``EVENT/NAME.jpg``); the ground-truth folder holds
the official ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat``. Output:
``predictions/EVENT/NAME.txt`` (the official submission layout), ``ap.json``, ``ap.md``,
``pr_curves.png`` and ``config.json``.
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from retinaface_core.evaluation import evaluate, format_ap_table, plot_pr_curves, submission_rows, write_predictions
from retinaface_core.preprocessing import InputScale
from retinaface_core.registry import RegistryError, resolve_model
from retinaface_core.weights import CheckpointError, load_weights
from retinaface_core.widerface import read_ground_truth_mat

from ._cluster import pool_size
from ._config import config_dict, format_config, parse_config
from ._storage import JobError, StorageOptions, filesystem, full_uri, list_input


@dataclass
class EvaluateConfig:
    """Run a detector over WIDER FACE val images and score it with the official Easy/Medium/Hard AP."""

    images: str = field(metadata={"help": "URI of the val image folder (EVENT/NAME.jpg below it)"})
    ground_truth: str = field(metadata={"help": "URI of the folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat"})
    output: str = field(metadata={"help": "URI where predictions/ and the AP report are written"})
    weights: str | None = field(default=None, metadata={"help": "checkpoint name, path or URI, a model registry URI (its current version) or REGISTRY/vNNNN (default: $RETINAFACE_WEIGHTS or mobilenet0.25-1mb)"})
    model_config: str | None = field(default=None, metadata={"help": "architecture/anchor config name for an unregistered checkpoint"})
    scale: str = field(default="original", metadata={"help": "network input size: original or long:N (the protocol's single-scale settings)"})
    score_threshold: float = field(default=0.02, metadata={"help": "keep detections above this (low: AP integrates over all thresholds)"})
    nms_iou: float = field(default=0.4, metadata={"help": "NMS IoU threshold"})
    top_k: int = field(default=5000, metadata={"help": "candidates per image before NMS"})
    keep_top_k: int = field(default=750, metadata={"help": "detections kept per image after NMS"})
    subset: bool = field(default=False, metadata={"help": "score only the images found under --images (default: every val image; missing ones count as misses)"})
    actors: int | None = field(default=None, metadata={"help": "detector actors (default: one per GPU with --num-gpus-per-actor, else one per CPU of the cluster)"})
    batch_size: int = field(default=4, metadata={"help": "images per actor call"})
    num_gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per detector actor (0: CPU)"})
    s3_endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (default: $AWS_ENDPOINT_URL / AWS config)"})
    s3_anonymous: bool = field(default=False, metadata={"help": "access S3 without credentials"})
    s3_region: str | None = field(default=None, metadata={"help": "S3 region (default: AWS environment/config)"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)"})

    @property
    def storage(self) -> StorageOptions:
        return StorageOptions(self.s3_endpoint_url, self.s3_anonymous, self.s3_region)


class WiderPredictor:
    """Ray Data actor UDF: image URIs in, one row per image with its detections as (N, 5) x, y, w, h, score."""

    def __init__(self, config: EvaluateConfig, checkpoint: str | None) -> None:
        import torch

        from retinaface_core import Detector

        self.storage = config.storage
        device = "cuda" if config.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.detector = Detector(
            checkpoint, config=config.model_config, device=device, scale=config.scale,
            score_threshold=config.score_threshold, nms_iou=config.nms_iou,
            top_k=config.top_k, keep_top_k=config.keep_top_k,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ._annotator import decode_one

        decoded = [decode_one(str(uri), self.storage, 10**9) for uri in batch["uri"]]
        images = [d.image for d in decoded if d.image is not None]
        found = iter(self.detector.detect(images) if images else [])
        rows, errors = [], []
        for item in decoded:
            if item.image is None:
                rows.append(np.zeros((0, 5), np.float64).tobytes())
                errors.append(item.error)
                continue
            faces = next(found)
            rows.append(submission_rows(faces.boxes, faces.scores).tobytes())
            errors.append("")
        return {"uri": batch["uri"], "detections": np.array(rows, dtype=object), "error": np.array(errors, dtype=object)}


def image_names(uris: Sequence[str], root: str) -> dict[str, str]:
    """``"EVENT/NAME"`` (the path below the image root, no extension) per image URI."""
    prefix = root.rstrip("/") + "/"
    names = {}
    for uri in uris:
        if not uri.startswith(prefix):
            raise JobError(f"{uri} is not below the image folder {root}")
        names[uri] = posixpath.splitext(uri[len(prefix):])[0]
    return names


def run(config: EvaluateConfig) -> dict:
    """Evaluate and write the report; returns the contents of ``ap.json``."""
    import ray

    try:
        InputScale.parse(config.scale)
        checkpoint, version = resolve_model(config.weights) if config.weights else (None, None)
        weights = load_weights(checkpoint, config=config.model_config)
    except (ValueError, CheckpointError, RegistryError) as exc:
        raise JobError(str(exc)) from exc
    gt = read_ground_truth_mat(config.ground_truth)
    fs, root = filesystem(config.images, config.storage)
    uris = list_input(config.images, config.storage)
    if not uris:
        raise JobError(f"no images under {config.images}")
    names = image_names(uris, full_uri(fs, root))
    unknown = sorted(set(names.values()) - set(gt.boxes))
    if unknown:
        raise JobError(f"{len(unknown)} images under {config.images} are not WIDER val images, e.g. {unknown[:3]}")

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=config.ray_address)
    actors = min(
        -(-len(uris) // config.batch_size), config.actors or pool_size(ray.cluster_resources(), 1.0, config.num_gpus_per_actor)
    )
    dataset = ray.data.from_items([{"uri": uri} for uri in uris]).map_batches(
        WiderPredictor,
        # The registry is resolved once, here; each actor resolves a name or URI itself.
        fn_constructor_args=(config, checkpoint),
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=config.num_gpus_per_actor or None,
    )
    predictions, errors = {}, {}
    for row in dataset.iter_rows():
        name = names[row["uri"]]
        if row["error"]:
            errors[name] = row["error"]
        else:
            predictions[name] = np.frombuffer(row["detections"], dtype=np.float64).reshape(-1, 5)
    seconds = time.perf_counter() - start
    if errors:
        raise JobError(f"{len(errors)} val images could not be read, so no AP is reported: " + "; ".join(list(errors.values())[:5]))

    result = evaluate(predictions, gt, subset=config.subset)
    out = config.output.rstrip("/")
    write_predictions(predictions, f"{out}/predictions")
    report = {
        "ap": result.ap,
        "num_images": result.num_images,
        "num_predictions": result.num_predictions,
        "num_faces": result.num_faces,
        "subset": config.subset,
        "scale": config.scale,
        "model_name": weights.name,
        "model_version": version,
        "model_sha256": weights.sha256,
        "detect_seconds": round(seconds, 3),
    }
    out_fs, out_root = filesystem(out, config.storage)
    out_fs.pipe({
        f"{out_root}/ap.json": json.dumps(report, indent=2).encode(),
        f"{out_root}/ap.md": (format_ap_table(result) + "\n").encode(),
        f"{out_root}/config.json": json.dumps(config_dict(config), indent=2).encode(),
    })
    plot_pr_curves(result, f"{out}/pr_curves.png")
    print(format_ap_table(result))
    print(f"{len(predictions)} images in {seconds:.1f} s; report written to {out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(EvaluateConfig, argv)
    print("jobs.evaluate settings:\n" + format_config(config), flush=True)
    try:
        run(config)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
