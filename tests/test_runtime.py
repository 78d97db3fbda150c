"""The process settings that CPU inference relies on: runtime.keep_freed_memory and bound_kernel_caches."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource
import torch
from retinaface_core import RetinaFace, get_config
from retinaface_core.model import optimize_for_inference
from retinaface_core.runtime import keep_freed_memory

net = optimize_for_inference(RetinaFace(get_config("mobilenet0.25-1mb"))).to(memory_format=torch.channels_last)
x = torch.randn(1, 3, 640, 640).contiguous(memory_format=torch.channels_last)

def faults_per_pass():
    with torch.inference_mode():
        net(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            net(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

default = faults_per_pass()
assert keep_freed_memory()
print(default, faults_per_pass())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is specific to glibc's malloc")
def test_forward_passes_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    # A fresh process: the setting is process-wide, and other tests have made it already.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, pinned = map(float, out.split())
    assert pinned <= 2, f"{pinned} page faults per 640x640 forward with the setting ({default} without)"


SHAPES_PROBE = """
import os
import numpy as np, psutil, torch
from retinaface_core import Detector, RetinaFace, get_config
from retinaface_core.weights import LoadedWeights

torch.set_num_threads(1)
config = get_config("mobilenet0.25-1mb")
detector = Detector(LoadedWeights(RetinaFace(config), config, "random", "random", ""), scale="original")
rng = np.random.default_rng(0)
for i in range(500):
    height, width = rng.integers(64, 160, 2)
    detector.detect(np.full((height, width, 3), 100, np.uint8))
    if i == 19:
        start = psutil.Process().memory_info().rss
print(os.environ["LRU_CACHE_CAPACITY"], psutil.Process().memory_info().rss - start)
"""


def test_kernel_caches_are_capped_so_new_image_sizes_do_not_grow_memory_without_bound():
    def growth(env: dict[str, str]) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", SHAPES_PROBE], capture_output=True, text=True, check=True, env=env).stdout.split()
        return out[0], int(out[1])

    # Detectors of this test process have set the variables already; the probes start without.
    base = {k: v for k, v in os.environ.items() if k not in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")}
    capacity, capped = growth(base)
    assert capacity == "256"
    # A value the user set wins over the Detector's default.
    capacity, library_default = growth({**base, "LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    assert capacity == "1024"
    assert capped < 0.8 * library_default, (capped >> 20, library_default >> 20)
