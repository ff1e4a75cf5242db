"""The Hydra config tree: every experiment composes and builds, overrides swap parts, and a bad
pairing stops at start-up with one sentence."""
import subprocess
import sys

import pytest
from helpers import ROOT, compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from backbones import MobileNetV1, MobileNetV2
from tasks.analysis.complexity import count_complexity
from tasks.errors import ConfigError
from tasks.training.config_checks import check_train_config
from tasks.training.model import build_model

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment):
    cfg = compose_train([f"experiment={experiment}", "backbone.pretrained=null"])
    if str(OmegaConf.to_container(cfg.dataset, resolve=False).get("class_names", "")).startswith("${mv."):
        # the user's own data: the classes are read from dataset.root, or given once
        cfg = compose_train([f"experiment={experiment}", "backbone.pretrained=null",
                             "dataset.class_names=[background,thing]"])
        assert cfg.dataset.num_classes == 2
    model = build_model(cfg.backbone, cfg.head, cfg.dataset.num_classes)
    assert cfg.head.task == cfg.dataset.task
    assert sum(p.numel() for p in model.parameters()) > 0


def test_backbone_swap_by_override_rebuilds_the_head_for_the_new_channels():
    import torch

    v2 = compose_train(["experiment=ssdlite_mobilenet_v2_coco", "backbone.pretrained=null"])
    v1 = compose_train(["experiment=ssdlite_mobilenet_v2_coco", "backbone=mobilenet_v1", "backbone.pretrained=null"])
    assert v1.dataset == v2.dataset and v1.head == v2.head and v1.optim == v2.optim
    m1 = build_model(v1.backbone, v1.head, v1.dataset.num_classes)
    m2 = build_model(v2.backbone, v2.head, v2.dataset.num_classes)
    assert isinstance(m1.backbone, MobileNetV1) and isinstance(m2.backbone, MobileNetV2)
    images = torch.randn(1, 3, 320, 320)
    # the MobileNetV2 paper's Table 6 rows, whole model at 320x320 (DESIGN.md, direct count)
    assert count_complexity(m1, images).params / 1e6 == pytest.approx(5.10, rel=0.03)
    assert count_complexity(m2, images).params / 1e6 == pytest.approx(4.34, rel=0.03)


def test_dataset_configs_instantiate_on_the_real_samples(shared_data):
    cfg = compose_train(["dataset=coco", f"dataset.root={shared_data / 'coco128'}",
                         "dataset.val.image_dir=${dataset.root}/train2017",
                         "dataset.val.ann_file=${dataset.root}/annotations/instances_train2017.json"])
    val = instantiate(cfg.dataset.val)
    image, target = val[0]
    assert image.shape == (3, 320, 320) and target["boxes"].shape[1] == 4


def test_head_dataset_mismatch_is_one_sentence():
    cfg = compose_train(["head=deeplabv3", "dataset=shapes_det"])
    with pytest.raises(ConfigError) as err:
        check_train_config(cfg)
    message = str(err.value)
    assert "head=" in message and "detection" in message and "segmentation" in message
    assert message.count(". ") == 0 and message.endswith(").")


def test_head_dataset_mismatch_stops_the_cli_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tasks.train", "head=ssdlite", "dataset=shapes_seg",
                             f"dataset.root={tmp_path / 'never_written'}", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "head=ssdlite needs detection annotations but dataset=shapes_seg provides segmentation" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never_written").exists()


@pytest.mark.parametrize("override,key", [("backbone.width_mult=0", "backbone.width_mult=0"),
                                          ("backbone.output_stride=12", "backbone.output_stride=12")])
def test_bad_backbone_values_are_one_sentence(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_train_config(compose_train([override]))
