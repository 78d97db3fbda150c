"""The RetinaFace network (Deng et al., 2020): backbone, FPN, SSH context modules, heads.

Module and parameter names follow the widely used PyTorch port (biubug6/Pytorch_Retinaface)
so that its published checkpoints load strictly: ``body.stage1.0.0.weight`` (MobileNet-0.25),
``body.layer2.0.conv1.weight`` (ResNet-50 in torchvision's layout), ``fpn.output1.0.weight``,
``ssh1.conv3X3.0.weight``, ``ClassHead.0.conv1x1.weight``, ``BboxHead.*``, ``LandmarkHead.*``.
"""

from __future__ import annotations

import copy
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .config import RetinaFaceConfig


class RetinaFaceOutput(NamedTuple):
    """Raw head outputs for a batch, anchors ordered like :func:`anchors.generate_priors`.

    boxes: (B, A, 4) encoded offsets (dx, dy, dw, dh);
    logits: (B, A, 2) face/not-face logits (index 1 = face);
    landmarks: (B, A, 10) encoded landmark offsets (x0, y0, ..., x4, y4).
    """

    boxes: Tensor
    logits: Tensor
    landmarks: Tensor


def _activation(leaky: float) -> nn.Module:
    return nn.ReLU(inplace=True) if leaky == 0 else nn.LeakyReLU(negative_slope=leaky, inplace=True)


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), _activation(leaky))


def conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup))


def conv_bn1x1(inp: int, oup: int, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), _activation(leaky))


def conv_dw(inp: int, oup: int, stride: int, leaky: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        _activation(leaky),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        _activation(leaky),
    )


class MobileNetV1Body(nn.Module):
    """MobileNet-0.25 body; returns the stride 8, 16 and 32 feature maps (64, 128, 256 channels)."""

    out_channels = (64, 128, 256)

    def __init__(self, leaky: float) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky),
            conv_dw(8, 16, 1, leaky),
            conv_dw(16, 32, 2, leaky),
            conv_dw(32, 32, 1, leaky),
            conv_dw(32, 64, 2, leaky),
            conv_dw(64, 64, 1, leaky),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2, leaky), *[conv_dw(128, 128, 1, leaky) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2, leaky), conv_dw(256, 256, 1, leaky))

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return [c3, c4, c5]


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), same attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Body(nn.Module):
    """ResNet-50 without avgpool/fc; returns layer2, layer3, layer4 (512, 1024, 2048 channels)."""

    out_channels = (512, 1024, 2048)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class FPN(nn.Module):
    """Top-down feature pyramid over the three body outputs."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, leaky: float) -> None:
        super().__init__()
        self.output1 = conv_bn1x1(in_channels[0], out_channels, leaky)
        self.output2 = conv_bn1x1(in_channels[1], out_channels, leaky)
        self.output3 = conv_bn1x1(in_channels[2], out_channels, leaky)
        self.merge1 = conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        out1 = self.output1(features[0])
        out2 = self.output2(features[1])
        out3 = self.output3(features[2])
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[-2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[-2:], mode="nearest"))
        return [out1, out2, out3]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields concatenated."""

    def __init__(self, in_channels: int, out_channels: int, leaky: float) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"SSH out_channels must be a multiple of 4, got {out_channels}")
        self.conv3X3 = conv_bn_no_relu(in_channels, out_channels // 2)
        self.conv5X5_1 = conv_bn(in_channels, out_channels // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn_no_relu(out_channels // 4, out_channels // 4)
        self.conv7X7_2 = conv_bn(out_channels // 4, out_channels // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn_no_relu(out_channels // 4, out_channels // 4)

    def forward(self, x: Tensor) -> Tensor:
        branch5_1 = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(branch5_1), self.conv7x7_3(self.conv7X7_2(branch5_1))], dim=1)
        return F.relu(out)


class _Head(nn.Module):
    """1x1 conv giving ``num_anchors * width`` values per pixel, flattened NHWC to (B, H*W*anchors, width)."""

    def __init__(self, in_channels: int, num_anchors: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv1x1 = nn.Conv2d(in_channels, num_anchors * width, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.width)


class RetinaFace(nn.Module):
    """RetinaFace detector network. Input: (B, 3, H, W) float, mean-subtracted, channel order per config."""

    def __init__(self, config: RetinaFaceConfig) -> None:
        super().__init__()
        self.config = config
        leaky = config.leaky
        if config.backbone == "mobilenet0.25":
            self.body: nn.Module = MobileNetV1Body(leaky)
            body_channels = MobileNetV1Body.out_channels
        else:
            self.body = ResNet50Body()
            body_channels = ResNet50Body.out_channels
        width = config.out_channels
        anchors = config.anchors_per_location
        levels = len(config.steps)
        self.fpn = FPN(body_channels, width, leaky)
        self.ssh1 = SSH(width, width, leaky)
        self.ssh2 = SSH(width, width, leaky)
        self.ssh3 = SSH(width, width, leaky)
        self.ClassHead = nn.ModuleList([_Head(width, anchors, 2) for _ in range(levels)])
        self.BboxHead = nn.ModuleList([_Head(width, anchors, 4) for _ in range(levels)])
        self.LandmarkHead = nn.ModuleList([_Head(width, anchors, 10) for _ in range(levels)])

    def forward(self, images: Tensor) -> RetinaFaceOutput:
        pyramid = self.fpn(self.body(images))
        features = [self.ssh1(pyramid[0]), self.ssh2(pyramid[1]), self.ssh3(pyramid[2])]
        return RetinaFaceOutput(
            boxes=torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1),
            logits=torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1),
            landmarks=torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1),
        )


def _fuse_children(module: nn.Module, bn_outputs: dict[nn.Module, tuple[Tensor, Tensor]]) -> None:
    # Every Conv2d directly followed by a BatchNorm2d in registration order is applied
    # that way in this file's forward methods, so the pair can be folded into one conv.
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        conv, bn = module._modules[first], module._modules[second]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fused = fuse_conv_bn_eval(conv, bn)
            bn_outputs[fused] = (bn.bias.detach().clone(), bn.weight.detach().abs().clone())
            module._modules[first] = fused
            module._modules[second] = nn.Identity()
    for child in module.children():
        _fuse_children(child, bn_outputs)


def _fuse(model: RetinaFace) -> tuple[RetinaFace, dict[nn.Module, tuple[Tensor, Tensor]]]:
    """An eval-mode copy with BatchNorm folded, and for each fused conv the (mean, std) per
    channel of its output on the training data: the folded BatchNorm's (beta, |gamma|)."""
    fused = copy.deepcopy(model).eval()
    bn_outputs: dict[nn.Module, tuple[Tensor, Tensor]] = {}
    _fuse_children(fused, bn_outputs)
    return fused, bn_outputs


def fuse_batchnorm(model: RetinaFace) -> RetinaFace:
    """Return an eval-mode copy with every BatchNorm folded into the preceding convolution.

    The copy computes the same function (up to float rounding) without a kernel per BatchNorm;
    its state_dict no longer has the published layout, so load weights before fusing.
    """
    return _fuse(model)[0]


def _merge_heads(heads: tuple[_Head, ...], num_anchors: int) -> nn.Conv2d:
    """One 1x1 conv whose output channels are, anchor by anchor, the channels of ``heads`` in order."""
    first = heads[0].conv1x1
    merged = nn.Conv2d(first.in_channels, num_anchors * sum(h.width for h in heads), 1)
    weights, biases = [], []
    for anchor in range(num_anchors):
        for head in heads:
            rows = slice(anchor * head.width, (anchor + 1) * head.width)
            bias = head.conv1x1.bias
            assert bias is not None  # nn.Conv2d's default, which the heads keep
            weights.append(head.conv1x1.weight[rows])
            biases.append(bias[rows])
    assert merged.bias is not None
    with torch.no_grad():
        merged.weight.copy_(torch.cat(weights))
        merged.bias.copy_(torch.cat(biases))
    return merged.to(first.weight.device)


class InferenceRetinaFace(nn.Module):
    """A trained :class:`RetinaFace` rearranged for inference; the same function, fewer kernels.

    BatchNorm is folded into the convolutions, and the box, class and landmark heads of each
    level become one 1x1 convolution whose 16 channels per anchor are sliced into the three
    outputs afterwards: 3 head convolutions and 1 concatenation instead of 9 and 3. The outputs
    are strided views of one (B, A, 16) tensor. Not trainable and not loadable from a
    checkpoint: build it from a loaded model with :func:`optimize_for_inference`.
    """

    def __init__(self, model: RetinaFace) -> None:
        super().__init__()
        fused, self._bn_outputs = _fuse(model)
        self.body, self.fpn = fused.body, fused.fpn
        self.ssh = nn.ModuleList([fused.ssh1, fused.ssh2, fused.ssh3])
        self.widths = (4, 2, 10)
        self.heads = nn.ModuleList(
            _merge_heads(cast("tuple[_Head, ...]", level_heads), model.config.anchors_per_location)
            for level_heads in zip(fused.BboxHead, fused.ClassHead, fused.LandmarkHead)
        )
        self.eval()

    def forward(self, images: Tensor) -> RetinaFaceOutput:
        pyramid = self.fpn(self.body(images))
        per_anchor = sum(self.widths)
        levels = []
        for ssh, head, feature in zip(self.ssh, self.heads, pyramid):
            out = head(ssh(feature)).permute(0, 2, 3, 1)
            levels.append(out.reshape(out.shape[0], -1, per_anchor))
        boxes, logits, landmarks = torch.cat(levels, dim=1).split(self.widths, dim=-1)
        return RetinaFaceOutput(boxes=boxes, logits=logits, landmarks=landmarks)


def optimize_for_inference(model: RetinaFace, dtype: torch.dtype = torch.float32) -> InferenceRetinaFace:
    """An eval-mode copy of ``model`` rearranged for fast inference (see :class:`InferenceRetinaFace`),
    its parameters in ``dtype``.

    In a lower precision than float32 every convolution's bias is first corrected for what
    rounding its weights shifts its output by on average (:func:`correct_rounding_bias`).
    """
    network = InferenceRetinaFace(model)
    if dtype != torch.float32:
        correct_rounding_bias(network, dtype)
    return network.to(dtype)


def correct_rounding_bias(network: InferenceRetinaFace, dtype: torch.dtype, size: int = 640, seed: int = 0) -> None:
    """Subtract from each convolution's bias the mean output shift that rounding its weights to
    ``dtype`` causes: ``(round(W) - W) @ E[input]`` per output channel (bias correction, Nagel et
    al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction", sec. 4.2).

    Data-free and deterministic: ``E[input]`` comes from one float32 pass of a ``size`` x ``size``
    pair of inputs in which every fused convolution's output is drawn from the distribution its
    folded BatchNorm was trained to produce, N(beta, gamma^2) per channel, so the activations,
    additions, upsampling and concatenations between layers shape the means as in the network.
    Rounding errors are then zero-mean per channel instead of a fixed offset, which a cast
    without the correction leaves, costing AP (``docs/annotate.md``, "Batching, precision and GPUs").
    """
    generator = torch.Generator().manual_seed(seed)
    means: dict[nn.Module, Tensor] = {}

    def record(conv: nn.Module, args: tuple[Tensor, ...]) -> None:
        means[conv] = args[0].mean(dim=(0, 2, 3))

    def sample(conv: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        mean, std = network._bn_outputs[conv]
        noise = torch.randn(out.shape, generator=generator)
        return mean[None, :, None, None] + std[None, :, None, None] * noise

    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    hooks = [conv.register_forward_pre_hook(record) for conv in convs]
    hooks += [conv.register_forward_hook(sample) for conv in convs if conv in network._bn_outputs]
    try:
        with torch.no_grad():
            network.float().cpu()(torch.zeros(2, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for conv in convs:
            groups, weight = conv.groups, conv.weight
            error = (weight.to(dtype).float() - weight).sum(dim=(2, 3))  # (out, in / groups)
            group_of_output = torch.arange(conv.out_channels) // (conv.out_channels // groups)
            shift = (error * means[conv].view(groups, -1)[group_of_output]).sum(dim=1)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
            conv.bias -= shift
