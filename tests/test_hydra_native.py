"""The command line is Hydra's own: its flags, search paths and sweeps pass through, from any working
directory; only what Hydra raises is reworded into one sentence (exit code 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, tiny_shapes_overrides

from tasks.cli import composition_error

PLUGINS = ROOT / "docs" / "plugins"


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def crowded_folder(tmp_path: Path) -> Path:
    """What a Hydra user's project folder looks like: its own conf/ (with a train.yaml) and a tasks.py."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "train.yaml").write_text("not_ours: 1\n")
    (tmp_path / "tasks.py").write_text("raise SystemExit('the user tasks.py was imported')\n")
    return tmp_path


def test_hydra_flags_pass_through_from_a_folder_with_its_own_conf_and_tasks_py(tmp_path):
    """`python -m mobilevision train` (the spelling a tasks.py in the folder cannot hide; `python -m tasks.train`
    composes the same way, by the configs' file path) with --cfg and the user's --config-dir."""
    cwd = crowded_folder(tmp_path)
    job = run_cli(["-m", "mobilevision", "train", "--cfg", "job", "--config-dir", str(PLUGINS / "conf"),
                   "backbone=timm_mobilenetv3", "optim.optimizer.lr=0.5"], cwd)
    assert job.returncode == 0, job.stderr
    cfg = yaml.safe_load(job.stdout)
    assert cfg["backbone"]["_target_"] == "timm_backbone.TimmBackbone"  # found in the user's --config-dir
    assert cfg["optim"]["optimizer"]["lr"] == 0.5 and "not_ours" not in cfg


@pytest.mark.slow
def test_plain_python_m_tasks_and_hydra_flags_from_a_folder_with_its_own_conf(tmp_path):
    cwd = crowded_folder(tmp_path)
    assert "user tasks.py" in run_cli(["-m", "tasks.train", "-c", "job"], cwd).stderr  # why mobilevision's exists
    (cwd / "tasks.py").unlink()
    searchpath = f"hydra.searchpath=[{(PLUGINS / 'conf').as_uri()}]"
    job = run_cli(["-m", "tasks.train", "-c", "job", searchpath, "backbone=timm_mobilenetv3"], cwd)
    assert job.returncode == 0, job.stderr
    assert yaml.safe_load(job.stdout)["backbone"]["model_name"] == "mobilenetv3_large_100"
    info = run_cli(["-m", "tasks.evaluate", "--info", "defaults"], cwd)
    assert info.returncode == 0 and "Defaults List" in info.stdout, info.stderr
    wrong = run_cli(["-m", "tasks.train", "-m", "backbone=mobilenet_v3,mobilenet_v1"], cwd)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: backbone=mobilenet_v3 is not an option")
    assert wrong.stderr.count("\n") == 1, wrong.stderr


@pytest.mark.parametrize("override,expected", [
    ("epochs=abc", "epochs=abc is not allowed (Value 'abc' of type 'str' could not be converted to Integer); "
                   "expected an integer."),
    ("clip_grad_norm=big", "clip_grad_norm=big is not allowed"),
    ("channels_last=maybe", "channels_last=maybe is not allowed (Value 'maybe' is not a valid bool (type str)); "
                            "expected true or false."),
])
def test_a_wrong_type_stops_at_composition_naming_the_key(override, expected):
    message = composition_error("train", [override])
    assert message is not None and message.startswith(expected), message
    assert "\n" not in message and message.endswith(".")
    assert "expected a number or null" in composition_error("train", ["clip_grad_norm=big"])


def test_a_knob_the_schema_does_not_list_still_merges():
    """Another branch may add a knob to train.yaml: the schema types what it lists and lets the rest through."""
    assert composition_error("train", ["+brand_new_knob=3"]) is None


def test_multirun_lands_under_outputs_with_one_dir_per_job():
    with open(ROOT / "conf" / "train.yaml") as f:
        sweep = yaml.safe_load(f)["hydra"]["sweep"]
    assert sweep["dir"].startswith("outputs/") and "${hydra.job.num}" in sweep["subdir"]


@pytest.mark.slow
def test_an_optuna_sweep_of_two_trials_maximises_the_returned_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra is not installed "
                        "(pip install 'mobilevision[sweep]')")
    sweep_dir = tmp_path / "sweep"
    result = run_cli(["-m", "tasks.train", "-m", "experiment=demo_ssdlite_shapes", "hparams_search=shapes_optuna",
                      "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}", "epochs=1", "batch_size=4",
                      "threads=1", "head.extra_depths=[32,32]",
                      *tiny_shapes_overrides(tmp_path / "shapes", "coco", num_train=8, num_val=4, size=64)],
                     tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    best = {}
    for trial in trials:
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        params = {o.split("=")[0]: float(o.split("=")[1]) for o in overrides
                  if o.startswith(("optim.optimizer.lr=", "optim.weight_decay=", "backbone.width_mult="))}
        assert len(params) == 3 and 3e-4 <= params["optim.optimizer.lr"] <= 3e-2
        state = torch.load(trial / "best.ckpt", weights_only=True)
        assert state["config"]["optim"]["optimizer"]["lr"] == pytest.approx(params["optim.optimizer.lr"])
        best[trial.name] = state["best_metric"]
    summary = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert summary["best_value"] == pytest.approx(max(best.values()))  # the value main returned is AP's best
