"""The allocator setting that CPU inference relies on (runtime.keep_freed_memory)."""

from __future__ import annotations

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
