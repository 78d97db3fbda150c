"""The multi-task loss on hand-made anchors and targets, and on the shared checkpoint's own detections."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retinaface_core.anchors import generate_priors
from retinaface_core.box_coding import box_convert, box_iou, encode_boxes, encode_landmarks
from retinaface_core.loss import (
    FaceTargets,
    hard_negative_mask,
    match_anchors,
    multibox_loss,
)
from retinaface_core.model import RetinaFaceOutput

VARIANCES = (0.1, 0.2)


def anchors_from_boxes(boxes: list[list[float]]) -> torch.Tensor:
    """(A, 4) (cx, cy, w, h) priors from (x1, y1, x2, y2) boxes."""
    b = torch.tensor(boxes, dtype=torch.float32)
    return torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], dim=1)


def targets(boxes: list[list[list[float]]], landmarks: torch.Tensor | None = None, has: list[list[bool]] | None = None) -> FaceTargets:
    """Pad per-image box lists into a :class:`FaceTargets`."""
    batch, faces = len(boxes), max(len(b) for b in boxes)
    out = torch.zeros(batch, faces, 4)
    valid = torch.zeros(batch, faces, dtype=torch.bool)
    for i, image in enumerate(boxes):
        if image:
            out[i, : len(image)] = torch.tensor(image)
            valid[i, : len(image)] = True
    if landmarks is None:
        centre = (out[..., :2] + out[..., 2:]) / 2
        landmarks = centre[:, :, None, :].expand(batch, faces, 5, 2).clone()
    has_landmarks = valid.clone() if has is None else torch.tensor(has)
    return FaceTargets(out, landmarks, has_landmarks, valid)


# Four anchors on a 0..1 canvas: 0 and 1 overlap face A well, 2 is the best (but poor) anchor
# of the small face B, 3 is far from everything.
ANCHOR_BOXES = [[0.0, 0.0, 0.4, 0.4], [0.05, 0.05, 0.45, 0.45], [0.6, 0.6, 1.0, 1.0], [0.0, 0.6, 0.1, 0.7]]


def test_box_iou_and_anchor_corners() -> None:
    priors = anchors_from_boxes(ANCHOR_BOXES)
    assert torch.allclose(box_convert(priors, "cxcywh", "xyxy"), torch.tensor(ANCHOR_BOXES), atol=1e-6)
    iou = box_iou(torch.tensor([[0.0, 0.0, 0.2, 0.2]]), torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.6, 0.6]]))
    assert iou.shape == (1, 2)
    assert iou[0, 0].item() == pytest.approx(0.01 / 0.07)
    assert iou[0, 1].item() == 0.0


def test_match_threshold_and_forced_best_anchor() -> None:
    priors = anchors_from_boxes(ANCHOR_BOXES)
    face_a = [0.02, 0.02, 0.42, 0.42]  # IoU >= 0.35 with anchors 0 and 1
    face_b = [0.6, 0.6, 0.8, 0.8]  # best anchor 2 with IoU 0.25: below 0.35, forced anyway
    face_c = [0.45, 0.0, 0.5, 0.05]  # no anchor reaches IoU 0.2: ignored
    match = match_anchors(*_boxes_valid(targets([[face_a, face_b, face_c]])), priors)
    iou = box_iou(torch.tensor([face_a, face_b, face_c]), box_convert(priors, "cxcywh", "xyxy"))
    assert iou[0, 0] >= 0.35 and iou[0, 1] >= 0.35
    assert 0.2 <= iou[1, 2] < 0.35
    assert iou[2].max() < 0.2
    assert match.positive.tolist() == [[True, True, True, False]]
    assert match.gt_index[0, :3].tolist() == [0, 0, 1]
    assert 2 not in match.gt_index[0, match.positive[0]].tolist()


def test_match_forced_anchor_overrides_threshold_winner_and_later_face_wins() -> None:
    priors = anchors_from_boxes([[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]])
    big = [0.0, 0.0, 0.42, 0.42]  # best anchor 0, IoU 0.91
    small = [0.1, 0.1, 0.3, 0.3]  # best anchor 0 too (IoU 0.25): forced onto it after `big`
    match = match_anchors(*_boxes_valid(targets([[big, small]])), priors)
    assert match.positive.tolist() == [[True, False]]
    assert match.gt_index[0, 0].item() == 1


def test_match_is_per_image_and_ignores_padding() -> None:
    priors = generate_priors(64, 64, ((8, 16), (32,) * 2), (8, 16))
    rng = np.random.default_rng(0)
    per_image = []
    for n in (3, 0, 5):
        xy = rng.uniform(0, 0.7, (n, 2))
        wh = rng.uniform(0.1, 0.3, (n, 2))
        per_image.append(np.concatenate([xy, xy + wh], axis=1).tolist())
    batch = targets(per_image)
    # Padding rows hold a box that would match, to prove `valid` is honoured.
    batch.boxes[1, 0] = torch.tensor([0.0, 0.0, 0.25, 0.25])
    together = match_anchors(batch.boxes, batch.valid, priors)
    for i, image in enumerate(per_image):
        alone = match_anchors(*_boxes_valid(targets([image])), priors) if image else None
        if alone is None:
            assert not together.positive[i].any()
            continue
        assert torch.equal(together.positive[i], alone.positive[0])
        assert torch.equal(together.gt_index[i][alone.positive[0]], alone.gt_index[0][alone.positive[0]])


def test_match_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import retinaface_core.loss as loss_module

    priors = generate_priors(64, 64, ((8, 16), (32,) * 2), (8, 16))
    rng = np.random.default_rng(1)
    xy = torch.tensor(rng.uniform(0, 0.7, (4, 6, 2)), dtype=torch.float32)
    wh = torch.tensor(rng.uniform(0.05, 0.3, (4, 6, 2)), dtype=torch.float32)
    boxes, valid = torch.cat([xy, xy + wh], dim=-1), torch.ones(4, 6, dtype=torch.bool)
    whole = match_anchors(boxes, valid, priors)
    monkeypatch.setattr(loss_module, "_MATCH_CHUNK_ELEMENTS", 1)
    chunked = match_anchors(boxes, valid, priors)
    assert torch.equal(whole.positive, chunked.positive) and torch.equal(whole.gt_index, chunked.gt_index)


def test_hard_negative_mask_takes_three_hardest_negatives_per_positive() -> None:
    loss = torch.tensor([[9.0, 0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.0, 0.4]])
    positive = torch.zeros(1, 10, dtype=torch.bool)
    positive[0, 0] = True  # the highest loss is a positive: never counted as a negative
    negative = hard_negative_mask(loss, positive, 3.0)
    assert negative.nonzero()[:, 1].tolist() == [3, 5, 7]
    # Ratio capped by the negatives available; no positives -> no negatives.
    positive[0, :4] = True
    assert hard_negative_mask(loss, positive, 3.0).sum().item() == 6
    assert hard_negative_mask(loss, torch.zeros_like(positive), 3.0).sum().item() == 0


def _boxes_valid(t: FaceTargets) -> tuple[torch.Tensor, torch.Tensor]:
    return t.boxes, t.valid


def _random_output(batch: int, anchors: int, seed: int = 0) -> RetinaFaceOutput:
    g = torch.Generator().manual_seed(seed)
    return RetinaFaceOutput(
        boxes=torch.randn(batch, anchors, 4, generator=g),
        logits=torch.randn(batch, anchors, 2, generator=g),
        landmarks=torch.randn(batch, anchors, 10, generator=g),
    )


def test_loss_components_against_a_direct_computation() -> None:
    priors = generate_priors(64, 64, ((8, 16), (32, 48)), (8, 16))
    batch = targets([[[0.1, 0.1, 0.3, 0.35], [0.5, 0.4, 0.9, 0.95]], [[0.2, 0.6, 0.3, 0.7]]])
    output = _random_output(2, priors.shape[0])
    losses = multibox_loss(output, batch, priors, VARIANCES, box_weight=2.0, landmark_weight=1.0)

    match = match_anchors(batch.boxes, batch.valid, priors)
    pos = match.positive
    num_pos = int(pos.sum())
    assert losses.num_pos.item() == num_pos > 0
    expected_box = 0.0
    expected_landmark = 0.0
    expected_cls = 0.0
    for i in range(2):
        gt = match.gt_index[i, pos[i]]
        p = priors[pos[i]]
        expected_box += F.smooth_l1_loss(output.boxes[i, pos[i]], encode_boxes(batch.boxes[i, gt], p, VARIANCES), reduction="sum")
        expected_landmark += F.smooth_l1_loss(
            output.landmarks[i, pos[i]], encode_landmarks(batch.landmarks[i, gt], p, VARIANCES), reduction="sum"
        )
        # OHEM: 3 negatives per positive in this image, the ones most confidently called faces.
        background = torch.logsumexp(output.logits[i], -1) - output.logits[i, :, 0]
        negatives = background.masked_fill(pos[i], -math.inf).topk(3 * int(pos[i].sum())).indices
        expected_cls += F.cross_entropy(output.logits[i, pos[i]], torch.ones(int(pos[i].sum()), dtype=torch.long), reduction="sum")
        expected_cls += F.cross_entropy(output.logits[i, negatives], torch.zeros(len(negatives), dtype=torch.long), reduction="sum")
    assert losses.box.item() == pytest.approx(expected_box.item() / num_pos, rel=1e-5)
    assert losses.landmark.item() == pytest.approx(expected_landmark.item() / num_pos, rel=1e-5)
    assert losses.cls.item() == pytest.approx(expected_cls.item() / num_pos, rel=1e-5)
    assert losses.total.item() == pytest.approx(losses.cls.item() + 2 * losses.box.item() + losses.landmark.item(), rel=1e-6)


def test_landmark_loss_only_for_faces_with_landmarks() -> None:
    priors = generate_priors(64, 64, ((8, 16), (32, 48)), (8, 16))
    boxes = [[[0.1, 0.1, 0.3, 0.35], [0.5, 0.4, 0.9, 0.95]]]
    with_all = targets(boxes)
    # Face 1 has no landmarks: NaN there (as the WIDER readers give) must not reach the loss.
    landmarks = with_all.landmarks.clone()
    landmarks[0, 1] = float("nan")
    masked = FaceTargets(with_all.boxes, landmarks, torch.tensor([[True, False]]), with_all.valid)
    output = _random_output(1, priors.shape[0], seed=3)
    full, partial = multibox_loss(output, with_all, priors, VARIANCES), multibox_loss(output, masked, priors, VARIANCES)
    assert torch.isfinite(partial.total)
    assert partial.cls.item() == pytest.approx(full.cls.item()) and partial.box.item() == pytest.approx(full.box.item())

    match = match_anchors(with_all.boxes, with_all.valid, priors)
    face0 = match.positive[0] & (match.gt_index[0] == 0)
    expected = (
        F.smooth_l1_loss(
            output.landmarks[0, face0], encode_landmarks(with_all.landmarks[0, [0]], priors[face0], VARIANCES), reduction="sum"
        )
        / face0.sum()
    )
    assert partial.landmark.item() == pytest.approx(expected.item(), rel=1e-5)
    assert partial.landmark.item() != pytest.approx(full.landmark.item())

    # Gradients reach landmark outputs of face-0 anchors only.
    landmark_out = output.landmarks.clone().requires_grad_(True)
    multibox_loss(output._replace(landmarks=landmark_out), masked, priors, VARIANCES).total.backward()
    touched = landmark_out.grad[0].abs().sum(-1) > 0
    assert torch.equal(touched, face0)


def test_loss_is_zero_for_perfect_regression_and_finite_without_faces() -> None:
    priors = generate_priors(64, 64, ((8, 16), (32, 48)), (8, 16))
    batch = targets([[[0.1, 0.1, 0.3, 0.35]], []])
    match = match_anchors(batch.boxes, batch.valid, priors)
    gt = batch.boxes[0, match.gt_index[0]]
    perfect = RetinaFaceOutput(
        boxes=torch.stack([encode_boxes(gt, priors, VARIANCES), torch.zeros(priors.shape[0], 4)]),
        logits=torch.zeros(2, priors.shape[0], 2),
        landmarks=torch.stack(
            [encode_landmarks(batch.landmarks[0, match.gt_index[0]], priors, VARIANCES), torch.zeros(priors.shape[0], 10)]
        ),
    )
    losses = multibox_loss(perfect, batch, priors, VARIANCES)
    assert losses.box.item() == pytest.approx(0.0, abs=1e-6)
    assert losses.landmark.item() == pytest.approx(0.0, abs=1e-6)
    empty = multibox_loss(_random_output(1, priors.shape[0]), targets([[]]), priors, VARIANCES)
    assert empty.num_pos.item() == 0 and all(torch.isfinite(t) for t in empty)


@pytest.fixture(scope="module")
def checkpoint(weights_dir):
    from retinaface_core.weights import load_weights

    return load_weights("mobilenet0.25-1mb")


def test_checkpoint_loss_low_on_own_detections_high_on_shuffled(checkpoint, shared_dir) -> None:
    from retinaface_core.anchors import generate_priors as priors_for
    from retinaface_core.detector import Detector
    from retinaface_core.preprocessing import to_network_input

    size = 320
    image = cv2.imread(str(shared_dir / "images" / "crowd_baseball.jpg"))
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    detections = Detector(checkpoint, score_threshold=0.8).detect([image])[0]
    assert len(detections) >= 5, "the checkpoint should find several confident faces"
    boxes = torch.from_numpy(detections.boxes).clamp(0, size) / size
    landmarks = torch.from_numpy(detections.landmarks) / size
    own = FaceTargets(
        boxes[None], landmarks[None], torch.ones(1, len(boxes), dtype=torch.bool), torch.ones(1, len(boxes), dtype=torch.bool)
    )
    # Same faces (sizes, landmark layouts) moved to random places: the targets no longer fit the pixels.
    rng = np.random.default_rng(0)
    sizes = boxes[:, 2:] - boxes[:, :2]
    new_origin = torch.from_numpy(rng.uniform(0, 1, (len(boxes), 2)).astype(np.float32)) * (1 - sizes)
    shift = new_origin - boxes[:, :2]
    shuffled = FaceTargets(
        (boxes.view(-1, 2, 2) + shift[:, None]).view(-1, 4)[None], (landmarks + shift[:, None])[None], own.has_landmarks, own.valid
    )

    model = checkpoint.model.eval()
    priors = priors_for(size, size, checkpoint.config.min_sizes, checkpoint.config.steps)
    with torch.no_grad():
        output = model(to_network_input(image[None], checkpoint.config.mean_bgr, checkpoint.config.channel_order, torch.device("cpu")))
    on_own = multibox_loss(output, own, priors, checkpoint.config.variances)
    on_shuffled = multibox_loss(output, shuffled, priors, checkpoint.config.variances)
    assert on_own.num_pos > 0 and on_shuffled.num_pos > 0
    for component in ("total", "cls", "box", "landmark"):
        assert getattr(on_own, component) < 0.5 * getattr(on_shuffled, component), component
    assert on_own.total < 0.25 * on_shuffled.total
