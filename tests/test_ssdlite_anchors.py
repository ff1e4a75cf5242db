"""Default boxes against torchvision's DefaultBoxGenerator and the TF object detection API's box set."""
import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from backbones import MobileNetV2
from heads.ssdlite import DefaultBoxes, SSDLiteHead

GRIDS_320 = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]  # MobileNetV2 + SSDLite at 320x320


def torchvision_boxes(grids, height, width):
    generator = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
    images = ImageList(torch.zeros(1, 3, height, width), [(height, width)])
    maps = [torch.zeros(1, 1, h, w) for h, w in grids]
    return generator(images, maps)[0]


def to_pixel_xyxy(cxcywh, height, width):
    # The same arithmetic as DefaultBoxGenerator.forward.
    size = torch.tensor([width, height])
    return torch.cat([(cxcywh[:, :2] - 0.5 * cxcywh[:, 2:]) * size, (cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]) * size], -1)


def test_anchor_counts_at_320():
    tf = DefaultBoxes(6, reduced_first_map=True)
    tv = DefaultBoxes(6, reduced_first_map=False)
    assert tf(GRIDS_320).shape == (20 * 20 * 3 + (10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1) * 6, 4) == (2034, 4)
    assert tv(GRIDS_320).shape == (3234, 4)
    assert tv(GRIDS_320).shape[0] == torchvision_boxes(GRIDS_320, 320, 320).shape[0]
    assert tv.num_anchors_per_location() == DefaultBoxGenerator([[2, 3]] * 6).num_anchors_per_location()


@pytest.mark.parametrize("height,width,grids", [
    (320, 320, GRIDS_320),
    (256, 384, [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]),  # non-square input
])
def test_torchvision_variant_equals_default_box_generator(height, width, grids):
    ours = DefaultBoxes(6, min_scale=0.2, max_scale=0.95, aspect_ratios=(2, 3), reduced_first_map=False)
    expected = torchvision_boxes(grids, height, width)
    assert torch.equal(to_pixel_xyxy(ours(grids), height, width), expected)


def test_head_anchors_follow_real_map_sizes():
    backbone = MobileNetV2(out_features=("C4", "C5"))
    head = SSDLiteHead(backbone.feature_info, num_classes=3, reduced_first_map=False).eval()
    with torch.no_grad():
        out = head(backbone(torch.zeros(1, 3, 320, 320)))
    assert torch.equal(to_pixel_xyxy(out["anchors"], 320, 320), torchvision_boxes(GRIDS_320, 320, 320))
    assert out["cls_logits"].shape == (1, 3234, 4) and out["bbox_regression"].shape == (1, 3234, 4)


def test_tf_box_set_hand_computed():
    boxes = DefaultBoxes(6, reduced_first_map=True)
    assert boxes.scales == pytest.approx([0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0])
    anchors = boxes(GRIDS_320)
    r2 = math.sqrt(2)
    # First location of the 20x20 map: centre (0.025, 0.025); (0.1, 1), (0.2, 2), (0.2, 1/2).
    expected = torch.tensor([[0.025, 0.025, 0.1, 0.1], [0.025, 0.025, 0.2 * r2, 0.2 / r2],
                             [0.025, 0.025, 0.2 / r2, 0.2 * r2]])
    torch.testing.assert_close(anchors[:3], expected)
    # Second location moves along x (row-major H, W order like the predictors).
    torch.testing.assert_close(anchors[3, :2], torch.tensor([0.075, 0.025]))
    # The 1x1 map: centre 0.5; s=0.95, s'=sqrt(0.95 * 1.0); ratio 3 boxes clipped to [0, 1].
    r3 = math.sqrt(3)
    last = torch.tensor([[0.95, 0.95], [math.sqrt(0.95), math.sqrt(0.95)], [0.95 * r2, 0.95 / r2],
                         [0.95 / r2, 0.95 * r2], [0.95 * r3, 0.95 / r3], [0.95 / r3, 0.95 * r3]]).clamp(0, 1)
    torch.testing.assert_close(anchors[-6:, 2:], last)
    torch.testing.assert_close(anchors[-6:, :2], torch.full((6, 2), 0.5))


def test_cache_by_shape():
    boxes = DefaultBoxes(6)
    a = boxes(GRIDS_320)
    assert boxes(GRIDS_320) is a
    assert boxes([(h * 2, w * 2) for h, w in GRIDS_320]).shape[0] == 4 * 20 * 20 * 3 + (
        20 * 20 + 10 * 10 + 6 * 6 + 4 * 4 + 2 * 2) * 6


def test_bad_options_raise():
    with pytest.raises(ValueError, match="min_scale"):
        DefaultBoxes(6, min_scale=0.9, max_scale=0.2)
    with pytest.raises(ValueError, match="6 feature maps"):
        DefaultBoxes(6)(GRIDS_320[:5])
