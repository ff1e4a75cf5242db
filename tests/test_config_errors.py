"""Every kind of bad configuration stops before any work with one sentence naming the key, the value
and what is allowed (exit code 2, no traceback)."""
import subprocess
import sys

import pytest
from helpers import ROOT, compose_train, tiny_shapes_overrides

from tasks.cli import composition_error
from tasks.errors import ConfigError
from tasks.train import train
from tasks.training.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from tasks.training.config_checks import check_train_config
from tasks.training.model import build_model


def one_sentence(message: str) -> bool:
    return "\n" not in message.strip() and message.strip().endswith((".", ")"))


@pytest.mark.parametrize("override,expected", [
    ("backbone=mobilenet_v3", "backbone=mobilenet_v3 is not an option (did you mean backbone=mobilenet_v2?); "
                              "expected one of mobilenet_v1, mobilenet_v2."),
    ("dataset=cocoo", "dataset=cocoo is not an option (did you mean dataset=coco?)"),
    ("backbone.widht_mult=0.5", "backbone.widht_mult=0.5 names a key that does not exist (did you mean "
                                "backbone.width_mult?)"),
    ("epochz=3", "epochz=3 names a key that does not exist (did you mean epochs?)"),
    ("backbone.width_mult", "cannot read the override 'backbone.width_mult'; expected key=value"),
])
def test_command_line_mistakes_are_one_sentence(override, expected):
    message = composition_error("train", [override])
    assert message is not None and message.startswith(expected), message
    assert one_sentence(message)


def test_a_good_command_line_passes():
    assert composition_error("train", ["backbone=mobilenet_v1", "backbone.width_mult=0.5",
                                       "hydra.run.dir=/tmp/never"]) is None


@pytest.mark.parametrize("override,expected", [
    ("backbone.width_mult=0", "backbone.width_mult=0 is not allowed; expected a number > 0"),
    ("backbone.width_mult=-1", "backbone.width_mult=-1 is not allowed"),
    ("backbone.width_mult=wide", "backbone.width_mult=wide is not allowed"),
    ("backbone.output_stride=12", "backbone.output_stride=12 is not allowed; expected one of 8, 16, 32"),
    ("dataset.input_size=16", "dataset.input_size=16 cannot be taken by the model; expected a whole number"),
    ("batch_size=0", "batch_size=0 is not allowed; expected a positive integer"),
    ("optim.optimizer.lr=-0.1", "optim.optimizer.lr=-0.1 is not allowed; expected a number > 0"),
    ("num_workers=-1", "num_workers=-1 is not allowed; expected an integer >= 0"),
    ("num_workers=many", "num_workers=many is not allowed; expected an integer >= 0"),
    ("head=deeplabv3", "head=head needs segmentation annotations but dataset=dataset provides detection ones"),
])
def test_bad_values_are_one_sentence(override, expected):
    with pytest.raises(ConfigError) as err:
        check_train_config(compose_train([override]))
    assert str(err.value).startswith(expected), str(err.value)
    assert one_sentence(str(err.value))


def test_the_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    for argv in (["backbone=mobilenet_v3"], ["backbone.output_stride=12"]):
        result = subprocess.run([sys.executable, "-m", "tasks.train", *argv, f"hydra.run.dir={tmp_path}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "last.ckpt").exists()


def test_num_classes_that_disagree_with_a_checkpoint_name_both(tmp_path, caplog):
    cfg_overrides = ["experiment=demo_ssdlite_shapes", "backbone.width_mult=0.25", "epochs=1", "batch_size=2",
                     *tiny_shapes_overrides(tmp_path / "shapes_det", "coco", num_train=4, num_val=2, size=64)]
    cfg = compose_train(cfg_overrides)
    train(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run" / "last.ckpt"
    other = build_model(cfg.backbone, cfg.head, num_classes=80)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(other, load_checkpoint(checkpoint), checkpoint, num_classes=80)
    message = str(err.value)
    assert "trained for num_classes=3, this model has num_classes=80" in message
    assert "head.cls_predictors" in message and "in the checkpoint but" in message and one_sentence(message)

    coco_like = tmp_path / "coco80.ckpt"  # weights of the same architecture trained for COCO's 80 classes
    save_checkpoint({"model": other.state_dict(), "config": {"dataset": {"num_classes": 80}}}, coco_like)
    # fine-tuning from it: the class predictors that no longer fit are re-initialised, in one log line
    with caplog.at_level("INFO", logger="tasks.train"):
        train(compose_train([*cfg_overrides, f"init_from={coco_like}"]), tmp_path / "run2")
    lines = [r.getMessage() for r in caplog.records if "no longer fit" in r.getMessage()]
    assert len(lines) == 1 and "head.cls_predictors" in lines[0] and "backbone." not in lines[0]
    assert (tmp_path / "run2" / "last.ckpt").exists()


def test_a_train_split_smaller_than_one_batch_stops_before_training(tmp_path):
    """Full batches only: 8 images at batch_size=16 would run no step at all; it says so instead."""
    cfg = compose_train(["experiment=demo_ssdlite_shapes", "epochs=1", "batch_size=16", "backbone.width_mult=0.25",
                         "head.extra_depths=[32,32]", "threads=1",
                         *tiny_shapes_overrides(tmp_path / "shapes_det", "coco", num_train=8, num_val=2, size=64)])
    with pytest.raises(ConfigError) as err:
        train(cfg, tmp_path / "run")
    assert str(err.value) == ("the train split holds 8 images, fewer than one batch of batch_size=16 per process x 1 "
                              "processes, so no step would run; expected batch_size=8 or smaller, or more training "
                              "images.")
    assert one_sentence(str(err.value)) and not (tmp_path / "run" / "last.ckpt").exists()
