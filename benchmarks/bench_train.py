"""Training throughput of one worker on this machine, and how much of a step waits for data.

    RETINAFACE_WEIGHTS_DIR=../shared/weights python benchmarks/bench_train.py \\
        [--size 640] [--batch-size 8] [--steps 8] [--loader-workers 0 1 2] [--threads 2]

Runs the training job's own pieces in this process, exactly as one Ray Train worker runs them
(``WiderTrainDataset`` with the reference augmentation -> DataLoader -> ``train_one_epoch``:
forward, loss, backward, SGD step), on the 12 real WIDER val images in ``../shared`` with their
official boxes, from the published checkpoint. For each DataLoader worker count it prints
images/s, seconds per step and the share of the step time spent blocked on the next batch
(decode + augment not hidden behind compute). The first ``--warmup`` steps are not timed.
DDP's gradient all-reduce is not included (one worker).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from retinaface_core.augment import TrainAugment  # noqa: E402
from retinaface_core.training import (  # noqa: E402
    Schedule,
    WiderTrainDataset,
    collate_faces,
    make_optimizer,
    open_wider_dataset,
    train_one_epoch,
)
from retinaface_core.weights import load_weights  # noqa: E402

SHARED = Path(os.environ.get("RETINAFACE_SHARED", REPO_ROOT.parent / "shared"))


def measure(size: int, batch_size: int, steps: int, warmup: int, loader_workers: int, seed: int = 0) -> dict[str, float]:
    wider = SHARED / "widerface"
    dataset = open_wider_dataset(str(wider / "ground_truth" / "wider_face_val_bbx_gt.txt"), str(wider / "val" / "images"))
    present = [image for image in dataset.images if (wider / "val" / "images" / image.name).is_file()]
    dataset = replace(dataset, images=present)
    loaded = load_weights("mobilenet0.25-1mb")
    model, config = loaded.model.train(), loaded.config
    train_set = WiderTrainDataset(dataset, TrainAugment(size=size, mean_bgr=config.mean_bgr), seed=seed)
    optimizer = make_optimizer(model, 1e-3, 0.9, 5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(total_steps=warmup + steps, kind="cosine"))

    def run(n_steps: int, epoch: int):
        train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_size=batch_size,
            sampler=RandomSampler(train_set, replacement=True, num_samples=n_steps * batch_size),
            num_workers=loader_workers,
            collate_fn=collate_faces,
            prefetch_factor=2 if loader_workers else None,
        )
        return train_one_epoch(model, loader, optimizer, scheduler, config, torch.device("cpu"))

    run(warmup, 0)
    stats = run(steps, 1)
    return {
        "images_per_second": stats.images / stats.seconds,
        "seconds_per_step": stats.seconds / stats.steps,
        "data_wait_share": stats.data_seconds / stats.seconds,
        "loss_total": stats.loss_sums["total"] / stats.images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"one worker, batch {args.batch_size}, {args.size}x{args.size}, {args.steps} timed steps, "
        f"torch threads {args.threads}, {os.cpu_count()} CPUs"
    )
    print(f"{'loader workers':>15} {'images/s':>9} {'s/step':>7} {'waiting for data':>17}")
    for workers in args.loader_workers:
        result = measure(args.size, args.batch_size, args.steps, args.warmup, workers)
        print(f"{workers:>15} {result['images_per_second']:>9.2f} {result['seconds_per_step']:>7.2f} {result['data_wait_share']:>16.1%}")


if __name__ == "__main__":
    main()
