"""Numeric precision of the network: the names a setting takes and the dtype each one runs in.

Decoding, NMS and quality scores run in float32 whatever the precision; only the weights and
activations of the network change. Casting weights below float32 shifts each convolution's
output by the rounding error times its mean input; :func:`model.correct_rounding_bias` removes
that shift when the network is cast.
"""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def network_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the network's weights and activations for ``precision`` on ``device``.

    fp16 is for CUDA only: CPU kernels for it are missing or slower than fp32, where bf16 has
    oneDNN kernels (and the range of fp32, so no overflow in the heads' logits).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, not {device.type!r}; use bf16 (or fp32) on a CPU")
    return PRECISIONS[precision]
