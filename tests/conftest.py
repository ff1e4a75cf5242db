import json
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The CPU always; CUDA too where this machine has it (the device paths' tests, tests/test_*device_augment.py)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real COCO/VOC samples beside the project (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA} (the ../shared folder is absent)")
    return SHARED_DATA


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device the code under test should run on: "cpu", and "cuda" (skipped without one)."""
    return torch.device(request.param)


def build_deploy_artifacts(tmp_path_factory) -> dict:
    """One tiny checkpoint per task (1 epoch, 8 images of 64 px) and its default (dynamo) ONNX export,
    made once per pytest session and shared by test_export, test_predict and test_quantize."""
    from helpers import TINY, compose_train, tiny_shapes_overrides

    from tasks.deploy.onnx_export import export_checkpoint
    from tasks.train import train

    root = tmp_path_factory.getbasetemp() / "deploy_artifacts"
    done = root / "artifacts.json"
    if done.is_file():
        return json.loads(done.read_text())
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    artifacts = {}
    try:
        for task, (experiment, dataset, kind, extra) in TINY.items():
            cfg = compose_train([f"experiment={experiment}", "epochs=1", "batch_size=4", "backbone.width_mult=0.25",
                                 "threads=1", *extra,
                                 *tiny_shapes_overrides(root / dataset, kind, num_train=8, num_val=4, size=64)])
            train(cfg, root / f"run_{task}")
            checkpoint = root / f"run_{task}" / "last.ckpt"
            onnx_path = export_checkpoint(checkpoint, root / f"onnx_{task}" / "model.onnx")
            artifacts[task] = {"checkpoint": str(checkpoint), "onnx": str(onnx_path), "data": str(root / dataset)}
    finally:
        torch.set_num_threads(threads)
    done.write_text(json.dumps(artifacts))
    return artifacts


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on 2 shared cores: one thread is many times faster than two fighting for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return build_deploy_artifacts(tmp_path_factory)
