"""Progressive resizing: the schedule of sizes, and what the model really sees in a training run."""
import math

import pytest
import torch
from helpers import compose_train, tiny_shapes_overrides

import tasks.train as train_module
from tasks.errors import ConfigError
from tasks.train import train
from tasks.training.progressive import ProgressiveResize, resize_batch


def test_sizes_grow_linearly_to_the_input_size_in_multiples_of_32_and_the_last_epochs_run_at_full_size():
    schedule = ProgressiveResize(start_scale=0.5, full_at=0.75)
    sides = [schedule.size(e, 60, (320, 320))[0] for e in range(60)]
    assert sides[0] == 160 and all(s % 32 == 0 for s in sides)
    assert sides == sorted(sides)
    assert sides[45:] == [320] * 15 and sides[44] == 320  # epoch 44: 0.5 + 0.5 * 44/45 = 0.989 -> 320
    assert sides[10] == 192  # 0.5 + 0.5 * 10/45 = 0.611 of 320 = 195.6 -> 192
    # mean area: the compute a run spends, hand-summed from the list above
    assert schedule.mean_area(60, (320, 320)) == pytest.approx(sum(s * s for s in sides) / (60 * 320 * 320))
    assert schedule.mean_area(60, (320, 320)) < 0.7


def test_short_runs_still_end_at_the_input_size_and_odd_sizes_are_reached_exactly():
    schedule = ProgressiveResize(start_scale=0.5, full_at=0.75)
    assert [schedule.size(e, 1, (320, 320)) for e in range(1)] == [(320, 320)]
    assert [schedule.size(e, 2, (320, 320)) for e in range(2)] == [(160, 160), (320, 320)]
    assert schedule.size(9, 10, (300, 513)) == (300, 513)
    assert schedule.size(0, 10, (300, 513)) == (160, 256)  # 150 -> 160, 256.5 -> 256
    assert ProgressiveResize(start_scale=1.0).mean_area(30, (320, 320)) == 1.0


def test_resize_batch_is_antialiased_bilinear_and_leaves_a_full_size_batch_alone():
    images = torch.randn(2, 3, 64, 64)
    assert resize_batch(images, (64, 64)) is images
    expected = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(resize_batch(images, (32, 32)), expected)
    # antialiasing: a 2x reduction of a constant 2x2 block pattern gives its mean, not one of its pixels
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(32, 32)[None, None]
    assert resize_batch(checker, (32, 32)).abs().max() < 0.3


@pytest.mark.parametrize("spec, words", [
    ("{start_scale:0,full_at:0.5}", "progressive_resize.start_scale=0 must be in (0, 1]"),
    ("{start_scale:0.5,full_at:1.5}", "progressive_resize.full_at=1.5 must be in [0, 1]"),
    ("{start:0.5}", "progressive_resize has unknown keys ['start']"),
])
def test_a_bad_progressive_resize_stops_the_run_with_one_sentence(tmp_path, spec, words):
    cfg = compose_train(["experiment=demo_ssdlite_shapes", "epochs=1", f"progressive_resize={spec}",
                         *tiny_shapes_overrides(tmp_path / "shapes_det", "coco", 4, 2, 64)])
    with pytest.raises(ConfigError, match=None) as info:
        train(cfg, tmp_path / "run")
    assert words in str(info.value)


@pytest.mark.parametrize("experiment, dataset, kind, metric", [
    ("demo_ssdlite_shapes", "shapes_det", "coco", "AP"),
    ("demo_deeplabv3_shapes", "shapes_seg", "voc", "mIoU"),
])
def test_the_model_trains_on_the_scheduled_sizes_and_is_evaluated_at_the_input_size(tmp_path, monkeypatch,
                                                                                     experiment, dataset, kind,
                                                                                     metric):
    seen = []
    build = train_module.build_model

    def recording_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append((module.training,
                                                                            tuple(inputs[0].shape[-2:]))))
        return model

    monkeypatch.setattr(train_module, "build_model", recording_model)
    cfg = compose_train([f"experiment={experiment}", "epochs=2", "batch_size=4", "eval_every=2",
                         "progressive_resize={start_scale:0.5,full_at:0.5}",
                         *tiny_shapes_overrides(tmp_path / dataset, kind, 8, 4, 128)])
    metrics = train(cfg, tmp_path / "run")
    assert math.isfinite(metrics[metric])
    training = [size for is_training, size in seen if is_training]
    assert training == [(64, 64)] * 2 + [(128, 128)] * 2  # 8 images in batches of 4, per epoch
    assert {size for is_training, size in seen if not is_training} == {(128, 128)}
