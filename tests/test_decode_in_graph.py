"""decode_in_graph: an ONNX graph that ends in the dense part of SSDLite's decoding (scores, best score per anchor,
every anchor's box) gives, through decode_detections, exactly the detections the eager head.predict gives on the
same network outputs; random-weight (every pair a candidate) and trained-looking score distributions."""
import pytest
import torch
from torch import nn

from benchmarks.postprocess import PostprocessSettings, realistic_logits
from heads.ssdlite import BoxCoder, DefaultBoxes
from tasks.deploy.in_graph import DECODED_OUTPUTS
from tasks.deploy.onnx_export import ExportWrapper
from tasks.deploy.onnx_runtime import decode_detections

GRIDS_320 = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
SETTINGS = {"box_coder_weights": [10.0, 10.0, 5.0, 5.0], "score_threshold": 0.01, "nms_iou_threshold": 0.55,
            "topk_candidates": 300, "detections_per_image": 100, "nms_pre": 1000}
SIZES = [(320, 320), (240, 400)]


class RawOutputs(nn.Module):
    """Stands in for the network: returns fixed raw outputs, so the export wrapper adds exactly what a graph adds."""

    def __init__(self, outputs: dict[str, torch.Tensor]):
        super().__init__()
        self.outputs = outputs

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.outputs


def raw_outputs(kind: str, num_classes: int = 80, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    anchors = DefaultBoxes(6)(GRIDS_320)
    shape = (2, anchors.shape[0], num_classes + 1)
    if kind == "random":  # an untrained classifier: every class scores about 1 / (K + 1) > 0.01 everywhere
        logits = 0.1 * torch.randn(shape, generator=g)
    elif kind == "realistic":  # the benchmark's trained-looking distribution
        logits = torch.cat([realistic_logits(torch.Size((1, *shape[1:])), PostprocessSettings(), g)
                            for _ in range(2)])
    elif kind == "one_class":  # more than topk_candidates of one class in every prefix: the per-class top-k runs
        logits = torch.randn(shape, generator=g)
        logits[..., 1] += 4.0
    else:  # "empty": background everywhere in the second image
        logits = torch.randn(shape, generator=g)
        logits[..., 0] += 8.0
        logits[1, :, 0] = 50.0
    regression = 0.5 * torch.randn(shape[0], shape[1], 4, generator=g)
    regression[0, :5, 2:] = 30.0  # past the exp clamp
    return {"cls_logits": logits, "bbox_regression": regression, "anchors": anchors}


def graph_outputs(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [*raw, *DECODED_OUTPUTS]
    wrapper = ExportWrapper(RawOutputs(raw), names, box_coder=BoxCoder(tuple(SETTINGS["box_coder_weights"])))
    with torch.no_grad():
        return dict(zip(names, wrapper(torch.zeros(2, 3, 320, 320))))


def eager_detections(raw: dict[str, torch.Tensor], settings: dict) -> list[dict]:
    from heads.ssdlite.postprocess import postprocess

    return postprocess(raw["cls_logits"], raw["bbox_regression"], raw["anchors"], SIZES,
                       BoxCoder(tuple(settings["box_coder_weights"])), settings["score_threshold"],
                       settings["topk_candidates"], settings["nms_iou_threshold"], settings["detections_per_image"],
                       settings["nms_pre"])


@pytest.mark.parametrize("nms_pre", [1000, None])
@pytest.mark.parametrize("kind", ["random", "realistic", "one_class", "empty"])
def test_decoded_outputs_give_the_eager_detections(kind, nms_pre):
    raw = raw_outputs(kind)
    settings = SETTINGS | {"nms_pre": nms_pre}
    outputs = graph_outputs(raw)
    expected = eager_detections(raw, settings)
    # as ONNX Runtime hands them over: numpy arrays
    got = decode_detections({k: v.numpy() for k, v in outputs.items()}, SIZES, settings)
    if kind != "empty":
        assert all(len(e["scores"]) == settings["detections_per_image"] for e in expected)
    else:
        assert len(expected[1]["scores"]) == 0
    for e, g in zip(expected, got, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], e[key]), key
    # the logits alone (an older export, or the int8 graph) still decode to the same detections
    raw_only = decode_detections({k: v.numpy() for k, v in raw.items()}, SIZES, settings)
    for e, g in zip(expected, raw_only, strict=True):
        assert all(torch.equal(g[key], e[key]) for key in ("boxes", "scores", "labels"))


def test_eager_detections_are_torchvisions():
    """The reference above is itself torchvision's rule (its SSD.postprocess_detections, no cap needed here)."""
    from test_ssdlite_nms_pre import assert_same, torchvision_detections

    raw = raw_outputs("realistic")
    expected = torchvision_detections(raw["cls_logits"], raw["bbox_regression"], raw["anchors"], SIZES,
                                      {k: SETTINGS[k] for k in ("score_threshold", "topk_candidates",
                                                                "nms_iou_threshold", "detections_per_image")})
    assert_same(eager_detections(raw, SETTINGS), expected)


@pytest.mark.parametrize("kind", ["random", "realistic"])
def test_export_wrapper_of_a_real_network_decodes_like_head_predict(kind):
    """The wrapper the export traces, around SSDLite-MobileNetV2 at 320 with 80 classes (random weights: the
    worst case; or its logits replaced by trained-looking ones), against the model's own head.predict."""
    from benchmarks.postprocess import model_config
    from tasks.training.model import build_model

    settings = PostprocessSettings()
    cfg = model_config(settings)
    torch.manual_seed(0)
    model = build_model(cfg.backbone, cfg.head, settings.num_classes).eval()
    images = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = dict(model(images))
    if kind == "realistic":
        raw["cls_logits"] = realistic_logits(raw["cls_logits"].shape, settings, torch.Generator().manual_seed(1))
    names = [*raw, *DECODED_OUTPUTS]
    wrapper = ExportWrapper(RawOutputs(raw), names, box_coder=model.head.box_coder)
    with torch.no_grad():
        outputs = dict(zip(names, wrapper(images)))
    sizes = [(320, 320)]
    expected = model.head.predict(raw, sizes)
    got = decode_detections({k: v.numpy() for k, v in outputs.items()}, sizes,
                            {"box_coder_weights": list(model.head.box_coder.weights),
                             "score_threshold": model.head.score_threshold,
                             "topk_candidates": model.head.topk_candidates,
                             "nms_iou_threshold": model.head.nms_iou_threshold,
                             "detections_per_image": model.head.detections_per_image, "nms_pre": model.head.nms_pre})
    assert len(expected[0]["scores"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(got[0][key], expected[0][key]), key
