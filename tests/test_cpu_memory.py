"""cpu_memory=reuse (tasks/cpu_memory.py): freed tensor memory stays in the process, so a step that allocates
what the previous one freed takes no page faults; cpu_memory=system leaves glibc's defaults. The fault counts
are the kernel's (getrusage), in fresh processes, because the setting is process-wide."""
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_shapes_overrides

from tasks.cpu_memory import apply_cpu_memory, check_cpu_memory
from tasks.errors import ConfigError
from tasks.train import train

GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A stand-in for a training step: activations of several sizes above glibc's 32-MiB mmap ceiling and below
# it, allocated, written and freed together, ten times. Prints the page faults of the last three steps.
STEP_FAULTS = """
import json, resource, sys, torch
from tasks.cpu_memory import apply_cpu_memory
line = apply_cpu_memory(sys.argv[1], torch.device("cpu"))
sizes_mib = [157, 52, 59, 10, 4, 40, 1]
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    maps = [torch.empty(size * 2**20 // 4).fill_(1.0) for size in sizes_mib]
    total = sum(float(m[-1]) for m in maps)
    del maps
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"line": line, "faults": faults[-3:], "pages_per_step": sum(sizes_mib) * 256}))
"""


def _step_faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="the tuning is glibc's mallopt; this is not Linux with glibc")
def test_reuse_takes_no_page_faults_where_the_system_default_faults_every_page():
    system, reuse = _step_faults("system"), _step_faults("reuse")
    pages = system["pages_per_step"]
    # glibc's default maps the three tensors above 32 MiB afresh each step: every one of their pages faults
    assert all(f >= (157 + 52 + 59 + 40) * 256 for f in system["faults"]), system
    # reuse: the memory the last step freed serves this one (a few pages of Python's own objects at most)
    assert all(f < pages // 100 for f in reuse["faults"]), reuse
    assert reuse["line"].startswith("cpu_memory=reuse: freed tensor memory is kept"), reuse["line"]
    assert system["line"] == "cpu_memory=system: the C library's default allocation"


def test_not_applied_off_the_cpu_and_refused_when_unknown():
    assert "not applied, the step runs on cuda" in apply_cpu_memory("reuse", torch.device("cuda"))
    for bad in ("keep", None, True):
        with pytest.raises(ConfigError, match=f"cpu_memory={bad} is not allowed; expected reuse .* or system"):
            check_cpu_memory(bad)


def test_training_logs_the_setting_and_refuses_a_wrong_one(tmp_path, caplog):
    tiny = tiny_shapes_overrides(tmp_path / "shapes", "coco", 8, 4, 64)
    base = ["experiment=demo_ssdlite_shapes", "epochs=1", "batch_size=4", "backbone.width_mult=0.25",
            "head.extra_depths=[32,32]", "report=false", *tiny]
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        train(compose_train([*base, "cpu_memory=system"]), tmp_path / "run")
    assert "cpu_memory=system: the C library's default allocation" in caplog.text
    with pytest.raises(ConfigError, match="cpu_memory=lots is not allowed"):
        train(compose_train([*base, "cpu_memory=lots"]), tmp_path / "run2")


# One training step of each model family, twice, after filling the freed memory with NaN and then with zeros:
# with cpu_memory=reuse an op that reads memory it never wrote gives different (or NaN) gradients. It found
# oneDNN's bf16 channels_last dilated depthwise conv (DeepLab's output stride 16), now kept in fp32.
GRADIENTS_IGNORE_FREED_MEMORY = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from omegaconf import OmegaConf
from helpers import compose_train
from tasks.cpu_memory import reuse_freed_memory
from tasks.training.model import build_model
assert reuse_freed_memory()[0]
torch.set_num_threads(1)

def fill_freed_memory(value):
    blocks = [torch.full((2**k,), value) for k in range(10, 25) for _ in range(2)]
    del blocks

def gradients(cfg, size, amp, value):
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.backbone, resolve=True), cfg.head, cfg.dataset.num_classes)
    model = model.to(memory_format=torch.channels_last).train()
    images = torch.rand(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    if cfg.head.task == "segmentation":
        targets = torch.randint(0, cfg.dataset.num_classes, (2, size, size))
    else:
        targets = [{"boxes": torch.tensor([[0.1, 0.2, 0.6, 0.7]]), "labels": torch.tensor([1])}] * 2
    fill_freed_memory(value)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = sum(model.loss(model(images), targets).values())
    loss.backward()
    return {name: p.grad.float() for name, p in model.named_parameters()}

cases = {"deeplabv3 os16": (["experiment=deeplabv3_mobilenet_v2_voc", "backbone.pretrained=null"], 512),
         "ssdlite": (["experiment=ssdlite_mobilenet_v2_coco", "backbone.pretrained=null"], 320)}
for name, (overrides, size) in cases.items():
    cfg = compose_train(overrides)
    for amp in (True, False):
        nan, zero = gradients(cfg, size, amp, float("nan")), gradients(cfg, size, amp, 0.0)
        differ = [n for n in nan if not torch.equal(nan[n].nan_to_num(7.0), zero[n].nan_to_num(7.0))]
        print(name, "bf16" if amp else "fp32", len(nan), "differ:", ",".join(differ) or "none")
"""


@pytest.mark.skipif(not GLIBC_LINUX, reason="the tuning is glibc's mallopt; this is not Linux with glibc")
def test_training_gradients_do_not_depend_on_what_freed_memory_held():
    tests_dir = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", GRADIENTS_IGNORE_FREED_MEMORY, tests_dir], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4, done.stdout
    for line in lines:
        assert line.endswith("differ: none"), line
