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

from retinaface_core import DetectorSettings, StorageOptions
from retinaface_core.batching import PLAN_WINDOW_BATCHES
from retinaface_core.evaluation import evaluate, format_ap_table, plot_pr_curves
from retinaface_core.image_io import DEFAULT_MAX_PIXELS, fetch_image
from retinaface_core.storage import filesystem, full_uri, redact, write_file
from retinaface_core.widerface import WiderFormatError, read_ground_truth_mat, submission_rows, write_predictions

from ._cluster import init_ray, pool_size
from ._config import config_dict, format_config, parse_config
from ._model import ModelIdentity, load_detector, resolve_model_identity
from ._exit import JobError
from ._inputs import list_input


@dataclass
class EvaluateConfig:
    """Run a detector over WIDER FACE val images and score it with the official Easy/Medium/Hard AP."""

    images: str = field(metadata={"help": "URI of the val image folder (EVENT/NAME.jpg below it)"})
    ground_truth: str = field(metadata={"help": "URI of the folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat"})
    output: str = field(metadata={"help": "URI where predictions/ and the AP report are written"})
    # The protocol's settings: a low threshold, since AP integrates over all thresholds.
    detector: DetectorSettings = field(default_factory=lambda: DetectorSettings(scale="original", score_threshold=0.02), metadata={"flatten": ""})
    subset: bool = field(default=False, metadata={"help": "score only the images found under --images (default: every val image; missing ones count as misses)"})
    actors: int | None = field(default=None, metadata={"help": "detector actors (default: one per GPU with --num-gpus-per-actor, else one per CPU of the cluster)"})
    batch_size: int = field(default=4, metadata={"help": "images per forward pass; an actor call takes 4 batches with --batching bucket (as the annotation job's window), 1 with exact"})
    num_gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per detector actor (0: CPU)"})
    s3: StorageOptions = field(default_factory=StorageOptions, metadata={"flatten": "s3_"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster to join: auto, host:port, ray://... (default: $RAY_ADDRESS, else a new local Ray)"})


class WiderPredictor:
    """Ray Data actor UDF: image URIs in, one row per image with its detections as (N, 5) x, y, w, h, score."""

    def __init__(self, config: EvaluateConfig, model: ModelIdentity) -> None:
        self.storage = config.s3
        self.batch_size = config.batch_size
        self.detector = load_detector(config.detector, config.s3, model, config.num_gpus_per_actor)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Val photos are ordinary sizes: the job's pixel limit guards the annotation job's inputs.
        fetched = [fetch_image(str(uri), self.storage, DEFAULT_MAX_PIXELS) for uri in batch["uri"]]
        images = [f.image for f in fetched if f.image is not None]
        found = iter(self.detector.detect(images, self.batch_size) if images else [])
        rows, errors = [], []
        for item in fetched:
            if item.image is None:
                rows.append(np.zeros((0, 5), np.float64))
                errors.append(item.error)
                continue
            faces = next(found)
            rows.append(submission_rows(faces.boxes, faces.scores))
            errors.append("")
        return {"uri": batch["uri"], "detections": _ragged(rows), "error": np.array(errors, dtype=object)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding ``arrays`` as they are (numpy would stack equal shapes)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


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
    try:
        return _run(config)
    except JobError:
        raise
    except Exception as exc:  # a store or registry failing after its client's own retries, a bad file
        raise JobError(redact(f"{type(exc).__name__}: {exc}")) from exc


def _run(config: EvaluateConfig) -> dict:
    import ray

    model, _ = resolve_model_identity(config.detector, config.s3)
    try:
        gt = read_ground_truth_mat(config.ground_truth, config.s3)
    except (OSError, WiderFormatError) as exc:
        raise JobError(f"ground truth {config.ground_truth}: {exc}") from exc
    fs, root = filesystem(config.images, config.s3)
    uris = list_input(config.images, config.s3).to_pylist()
    if not uris:
        raise JobError(f"no images under {config.images}")
    names = image_names(uris, full_uri(fs, root))
    unknown = sorted(set(names.values()) - set(gt.boxes))
    if unknown:
        raise JobError(f"{len(unknown)} images under {config.images} are not WIDER val images, e.g. {unknown[:3]}")

    start = time.perf_counter()
    init_ray(config.ray_address)
    call = config.batch_size * (PLAN_WINDOW_BATCHES if config.detector.batching == "bucket" else 1)
    actors = min(-(-len(uris) // call), config.actors or pool_size(ray.cluster_resources(), 1.0, config.num_gpus_per_actor))
    dataset = ray.data.from_items([{"uri": uri} for uri in uris]).map_batches(
        WiderPredictor,
        fn_constructor_args=(config, model),
        batch_size=call,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=config.num_gpus_per_actor or None,
    )
    predictions, errors = {}, {}
    for row in dataset.iter_rows():
        name = names[row["uri"]]
        if row["error"]:
            errors[name] = row["error"]
        else:
            predictions[name] = np.asarray(row["detections"], dtype=np.float64).reshape(-1, 5)
    seconds = time.perf_counter() - start
    if errors:
        raise JobError(f"{len(errors)} val images could not be read, so no AP is reported: " + "; ".join(list(errors.values())[:5]))

    result = evaluate(predictions, gt, subset=config.subset)
    out = config.output.rstrip("/")
    write_predictions(predictions, f"{out}/predictions", config.s3)
    report = {
        "ap": result.ap,
        "num_images": result.num_images,
        "num_predictions": result.num_predictions,
        "num_faces": result.num_faces,
        "subset": config.subset,
        "scale": config.detector.scale,
        "tta": config.detector.tta,
        "batching": config.detector.batching,
        "precision": config.detector.precision,
        "model_name": model.name,
        "model_version": model.version,
        "model_sha256": model.sha256,
        "detect_seconds": round(seconds, 3),
    }
    write_file(f"{out}/ap.json", json.dumps(report, indent=2).encode(), config.s3)
    write_file(f"{out}/ap.md", (format_ap_table(result) + "\n").encode(), config.s3)
    write_file(f"{out}/config.json", json.dumps(config_dict(config), indent=2).encode(), config.s3)
    plot_pr_curves(result, f"{out}/pr_curves.png", config.s3)
    print(format_ap_table(result))
    print(f"{len(predictions)} images in {seconds:.1f} s; report written to {out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(EvaluateConfig, argv)
    print("jobs.evaluate settings:\n" + format_config(config), flush=True)
    try:
        run(config)
    except JobError as exc:
        print(f"evaluate: error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
