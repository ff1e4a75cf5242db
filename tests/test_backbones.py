"""The backbones against the papers' tables (DESIGN.md, "direct count" where the print is off)."""
import pytest
import torch

from backbones import ImageClassifier, MobileNetV1, MobileNetV2
from tasks.analysis.complexity import count_complexity, materialized_memory

# MobileNetV1 Table 6/7: (width, resolution) -> (MAdds M, params M)
V1_ROWS = [
    (1.0, 224, 569, 4.2), (0.75, 224, 325, 2.6), (0.5, 224, 149, 1.3), (0.25, 224, 41, 0.5),
    (1.0, 192, 418, 4.2), (1.0, 160, 290, 4.2), (1.0, 128, 186, 4.2),
]
# MobileNetV1 Table 2, by layer type: (MAdds %, params %); full conv by the direct count.
V1_SPLIT = {"1x1 conv": (94.86, 74.59), "depthwise conv": (3.06, 1.06),
            "full conv": (1.91, 0.02), "fully connected": (0.18, 24.33)}
# MobileNetV2, direct count: width -> (MAdds M, params M)
V2_ROWS = {1.0: (300.8, 3.50), 1.4: (582.0, 6.06)}


def _classifier_complexity(model_cls, width, size):
    return count_complexity(ImageClassifier(model_cls(width_mult=width)), torch.randn(1, 3, size, size))


@pytest.mark.parametrize("width,size,madds,params", V1_ROWS)
def test_mobilenet_v1_matches_paper(width, size, madds, params):
    c = _classifier_complexity(MobileNetV1, width, size)
    assert c.madds / 1e6 == pytest.approx(madds, rel=0.01)
    # the paper rounds params to 0.1M; BN adds ~0.02M the paper leaves out
    assert abs(c.params / 1e6 - params) <= 0.05


def test_mobilenet_v1_split_by_layer_type_matches_table_2():
    share = _classifier_complexity(MobileNetV1, 1.0, 224).share()
    for kind, (madds_pct, params_pct) in V1_SPLIT.items():
        assert share[kind][0] == pytest.approx(madds_pct, abs=0.5), kind
        assert share[kind][1] == pytest.approx(params_pct, abs=0.5), kind


@pytest.mark.parametrize("width", sorted(V2_ROWS))
def test_mobilenet_v2_matches_direct_count(width):
    madds, params = V2_ROWS[width]
    c = _classifier_complexity(MobileNetV2, width, 224)
    assert c.madds / 1e6 == pytest.approx(madds, rel=0.02)
    assert c.params / 1e6 == pytest.approx(params, rel=0.02)


def test_peak_materialized_memory_matches_v2_table_3():
    images = torch.randn(1, 3, 224, 224)
    v1 = materialized_memory(ImageClassifier(MobileNetV1()), images, bytes_per_element=2)
    v2 = materialized_memory(ImageClassifier(MobileNetV2()), images, bytes_per_element=2)
    assert max(b for _, b in v1.values()) / 1000 == pytest.approx(1600, rel=0.01)
    assert max(b for _, b in v2.values()) / 1000 == pytest.approx(400, rel=0.01)
    assert v1[(112, 112)][0] == 64 and v2[(112, 112)][0] == 16
    assert v2[(1, 1)][0] == 1280


def test_v2_width_below_one_keeps_1280_and_rounds_to_eight():
    m = MobileNetV2(width_mult=0.35)
    assert m.feature_info["C5"].channels == 1280
    assert all(block.out_channels % 8 == 0 for block in m.blocks)
    assert MobileNetV2(width_mult=1.4).feature_info["C5"].channels == 1792


def test_v1_keeps_minimum_depth():
    m = MobileNetV1(width_mult=0.005)  # 1024 x 0.005 = 5 < 8
    assert m.stem.out_channels == 8 and all(b.out_channels == 8 for b in m.blocks)


def test_v2_last_conv_switch_is_mnet_v2_star():
    assert MobileNetV2(last_conv=False).feature_info["C5"].channels == 320


EXPECTED_CHANNELS = {MobileNetV1: (128, 256, 512, 1024), MobileNetV2: (24, 32, 576, 1280)}
EXPECTED_STRIDES = {32: (4, 8, 16, 32), 16: (4, 8, 16, 16), 8: (4, 8, 8, 8)}


@pytest.mark.parametrize("model_cls", [MobileNetV1, MobileNetV2])
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_named_features_shapes_and_strides(model_cls, output_stride):
    model = model_cls(output_stride=output_stride).eval()
    size = 128
    features = model(torch.randn(2, 3, size, size))
    assert list(features) == ["C2", "C3", "C4", "C5"]
    for name, channels, stride in zip(features, EXPECTED_CHANNELS[model_cls], EXPECTED_STRIDES[output_stride]):
        info = model.feature_info[name]
        assert (info.channels, info.stride) == (channels, stride), name
        assert features[name].shape == (2, channels, size // stride, size // stride), name


@pytest.mark.parametrize("model_cls", [MobileNetV1, MobileNetV2])
def test_dilation_touches_only_the_tail(model_cls):
    torch.manual_seed(0)
    os32 = model_cls(output_stride=32).eval()
    os16 = model_cls(output_stride=16).eval()
    os16.load_state_dict(os32.state_dict())  # dilation changes no weight shape
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = os32(images), os16(images)
    for name in ("C2", "C3", "C4"):
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert b["C5"].shape[-1] == 128 // 16 and a["C5"].shape[-1] == 128 // 32


def test_out_features_selects_outputs_and_rejects_unknown_names():
    model = MobileNetV2(out_features=("C4", "C5"))
    assert list(model.feature_info) == ["C4", "C5"]
    assert list(model(torch.randn(1, 3, 64, 64))) == ["C4", "C5"]
    with pytest.raises(ValueError, match="C7"):
        MobileNetV2(out_features=("C7",))


@pytest.mark.parametrize("bad", [0, -1.0])
def test_bad_width_is_one_sentence(bad):
    with pytest.raises(ValueError, match="width_mult"):
        MobileNetV1(width_mult=bad)


def test_bad_output_stride_is_one_sentence():
    with pytest.raises(ValueError, match="output_stride=4 .*expected one of"):
        MobileNetV2(output_stride=4)
