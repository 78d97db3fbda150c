"""What differs between published RetinaFace checkpoints, as data.

Two checkpoints with identical parameter names and shapes can still need different
anchors, activations or input normalisation (see ``../shared/README.md``: running the
1 MB MobileNet checkpoint with the Pytorch_Retinaface settings makes every box 1.6-2x
too large). Each named checkpoint therefore carries one :class:`RetinaFaceConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Backbone = Literal["mobilenet0.25", "resnet50"]


@dataclass(frozen=True)
class RetinaFaceConfig:
    """Architecture and input convention of one RetinaFace checkpoint.

    Attributes:
        name: short identifier of this configuration.
        backbone: ``"mobilenet0.25"`` or ``"resnet50"``.
        leaky: negative slope of the activations in the MobileNet body, FPN and SSH
            (``0.0`` is a plain ReLU). The ResNet body always uses ReLU.
        min_sizes: anchor side lengths in input pixels, one tuple per FPN level.
        steps: FPN strides, one per level (8, 16, 32).
        variances: SSD box-coding variances (centre, size).
        mean_bgr: per-channel value subtracted from the input, in BGR order.
        channel_order: channel order the network was trained on (``"BGR"`` or ``"RGB"``).
        train_size: side of the square crops the checkpoint was trained on.
        out_channels: FPN/SSH width.
    """

    name: str
    backbone: Backbone
    leaky: float
    min_sizes: tuple[tuple[int, ...], ...]
    steps: tuple[int, ...] = (8, 16, 32)
    variances: tuple[float, float] = (0.1, 0.2)
    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)
    channel_order: Literal["BGR", "RGB"] = "BGR"
    train_size: int = 640
    out_channels: int = 64

    def __post_init__(self) -> None:
        if len(self.min_sizes) != len(self.steps):
            raise ValueError(f"config {self.name!r}: {len(self.min_sizes)} min_sizes levels for {len(self.steps)} steps")
        sizes = {len(level) for level in self.min_sizes}
        if len(sizes) != 1:
            raise ValueError(f"config {self.name!r}: every level needs the same number of anchors, got {self.min_sizes}")
        if self.backbone not in ("mobilenet0.25", "resnet50"):
            raise ValueError(f"config {self.name!r}: unknown backbone {self.backbone!r}")

    @property
    def anchors_per_location(self) -> int:
        return len(self.min_sizes[0])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetinaFaceConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RetinaFace config fields: {sorted(unknown)}")
        tuple_fields = {"steps", "variances", "mean_bgr"}
        values: dict[str, Any] = {k: tuple(v) if k in tuple_fields else v for k, v in data.items()}
        if "min_sizes" in values:
            values["min_sizes"] = tuple(tuple(level) for level in values["min_sizes"])
        return cls(**values)


CONFIGS: dict[str, RetinaFaceConfig] = {
    # biubug6/Face-Detector-1MB-with-landmark: plain ReLU, small anchors, 300x300 training crops.
    "mobilenet0.25-1mb": RetinaFaceConfig(
        name="mobilenet0.25-1mb",
        backbone="mobilenet0.25",
        leaky=0.0,
        min_sizes=((10, 20), (32, 64), (128, 256)),
        train_size=300,
        out_channels=64,
    ),
    # biubug6/Pytorch_Retinaface cfg_mnet: LeakyReLU(0.1) because out_channel <= 64.
    "mobilenet0.25": RetinaFaceConfig(
        name="mobilenet0.25",
        backbone="mobilenet0.25",
        leaky=0.1,
        min_sizes=((16, 32), (64, 128), (256, 512)),
        train_size=640,
        out_channels=64,
    ),
    # biubug6/Pytorch_Retinaface cfg_re50: out_channel 256, so its FPN/SSH slope is 0 (ReLU).
    "resnet50": RetinaFaceConfig(
        name="resnet50",
        backbone="resnet50",
        leaky=0.0,
        min_sizes=((16, 32), (64, 128), (256, 512)),
        train_size=840,
        out_channels=256,
    ),
}


def get_config(name_or_config: str | RetinaFaceConfig) -> RetinaFaceConfig:
    """Return a registered config by name (or pass a config through)."""
    if isinstance(name_or_config, RetinaFaceConfig):
        return name_or_config
    try:
        return CONFIGS[name_or_config]
    except KeyError:
        raise KeyError(f"unknown RetinaFace config {name_or_config!r}; known: {sorted(CONFIGS)}") from None
