"""Does a short fine-tune keep the pretrained model? Val AP before and after, through jobs.train.

    RETINAFACE_WEIGHTS_DIR=../shared/weights python benchmarks/bench_finetune.py [--seeds 0 1 2] \\
        [-- JOBS.TRAIN FLAGS, e.g. --lr 1e-3 --no-freeze-bn --min-face-size 2 for the old defaults]

Builds a WIDER-format dataset of the 12 real WIDER val images in ``../shared`` (links, nothing
copied) with their official boxes, then for each seed runs the training job itself
(``jobs.train.run``: Ray Train, one worker, batch 4, 3 epochs, from ``mobilenet0.25-1mb`` with the
job's fine-tuning defaults unless flags say otherwise) on those images, validating on the same
images with the official per-level ground truth at ``long:640``. Prints the AP (easy / medium /
hard) of the checkpoint before and of the fine-tuned model after. On the data it was trained on
the AP must not drop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from jobs._cluster import init_ray  # noqa: E402
from jobs._config import parse_config  # noqa: E402
from jobs.train import TrainConfig, run  # noqa: E402
from retinaface_core.training import open_wider_dataset, validate  # noqa: E402
from retinaface_core.weights import load_weights  # noqa: E402
from retinaface_core.widerface import LEVELS, read_bbx_gt, read_ground_truth_mat, write_bbx_gt  # noqa: E402

SHARED = Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared"))
SCALE = "long:640"


def make_dataset(root: Path) -> Path:
    """``root/val``: images/EVENT linked to ``../shared`` and the official boxes of those images."""
    images = SHARED / "widerface" / "val" / "images"
    names = sorted(str(p.relative_to(images)) for p in images.glob("*/*.jpg"))
    annotations = {
        a.name: a for a in read_bbx_gt(str(SHARED / "widerface" / "ground_truth" / "wider_face_val_bbx_gt.txt"), degenerate="drop")
    }
    val = root / "val"
    (val / "images").mkdir(parents=True)
    for event in sorted({name.split("/")[0] for name in names}):
        (val / "images" / event).symlink_to(images / event)
    write_bbx_gt([annotations[name] for name in names], str(val / "wider_face_val_bbx_gt.txt"))
    return val


def format_ap(ap: dict[str, float]) -> str:
    return " / ".join(f"{100 * ap[level]:.1f}" for level in LEVELS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one fine-tune per augmentation seed")
    parser.add_argument("--init", default="mobilenet0.25-1mb")
    parser.add_argument("flags", nargs="*", help="more jobs.train flags (after --)")
    args = parser.parse_args()
    gt_dir = str(SHARED / "widerface" / "ground_truth")
    with tempfile.TemporaryDirectory() as tmp:
        val = str(make_dataset(Path(tmp)))
        dataset = open_wider_dataset(val)
        before = load_weights(args.init)
        ap_before = validate(before.model, before.config, dataset, read_ground_truth_mat(gt_dir), scale=SCALE)
        init_ray(None)
        print(f"{len(dataset.images)} WIDER val images, AP easy / medium / hard at {SCALE}")
        print(f"before ({args.init}): {format_ap(ap_before)}")
        for seed in args.seeds:
            base = ["--train", val, "--val", val, "--val-gt", gt_dir, "--val-scale", SCALE, "--init", args.init]
            base += ["--num-workers", "1", "--batch-size", "4", "--epochs", "3", "--loader-workers", "1"]
            base += ["--storage", str(Path(tmp) / "runs"), "--name", f"seed{seed}", "--seed", str(seed), "--progress-every", "0"]
            cfg = parse_config(TrainConfig, base + args.flags)
            metrics = run(cfg)["metrics"]
            settings = f"lr {cfg.lr:g}, warm-up {cfg.warmup_epochs:g} epoch, freeze-bn {cfg.freeze_bn}, min face {cfg.min_face_size:g} px"
            print(f"after 3 epochs, seed {seed} ({settings}): {format_ap(metrics['val_ap'])}", flush=True)


if __name__ == "__main__":
    main()
