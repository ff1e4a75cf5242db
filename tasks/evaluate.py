"""Evaluate a checkpoint on its dataset's val split: `python -m tasks.evaluate checkpoint=...`, or a deployed
file: `python -m tasks.evaluate runtime=onnxruntime|litert|executorch artifact=model.onnx|.tflite|.pte`."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tasks.cli import run
from tasks.errors import ConfigError, user_errors_exit
from tasks.training import distributed as dist
from tasks.training.evaluation import evaluate as run_evaluation
from tasks.training.loaders import build_loader
from tasks.training.trained import load_trained_model, rebase_dataset_root


def load_deployed_with_config(artifact: str | Path, runtime: str, dataset_root: str | None = None,
                              threads: int | None = None):
    """(runner of a deployed file, the training config its sidecar carries): the deployed artifact is
    evaluated on its dataset's val split by the same evaluator as the checkpoint."""
    from tasks.deploy.runner import load_deployed

    model = load_deployed(artifact, runtime, threads)
    train_config = model.metadata.get("train_config")
    if not train_config:
        raise ConfigError(f"the sidecar of {artifact} carries no train_config; expected one written by "
                          f"tasks.export (it names the dataset to evaluate on).")
    cfg = OmegaConf.create(train_config)
    return model, (rebase_dataset_root(cfg, dataset_root) if dataset_root is not None else cfg)


def evaluate_checkpoint(checkpoint: str | Path | None, run_dir: str | Path, dataset_root: str | None = None,
                        batch_size: int = 16, num_workers: int = 2, progress: bool = True,
                        multiscale_flip: Sequence[float] | None = None, runtime: str = "pytorch",
                        artifact: str | Path | None = None, threads: int | None = None) -> dict[str, float]:
    """Metrics of a checkpoint (runtime=pytorch) or of a deployed `artifact` (runtime=onnxruntime|litert|
    executorch) on the val split."""
    if runtime == "pytorch":
        if not checkpoint:
            raise ConfigError("runtime=pytorch needs checkpoint=<path to a tasks.train checkpoint>.")
        model, cfg = load_trained_model(checkpoint, dataset_root)
    elif multiscale_flip:
        raise ConfigError(f"multiscale_flip runs the network at several input sizes; the deployed {runtime} "
                          f"graph has one fixed input size, so use runtime=pytorch or multiscale_flip=null.")
    elif not artifact:
        raise ConfigError(f"runtime={runtime} needs artifact=<file made by tasks.export>.")
    else:
        model, cfg = load_deployed_with_config(artifact, runtime, dataset_root, threads)
    if multiscale_flip and cfg.head.get("task") != "segmentation":
        raise ConfigError(f"multiscale_flip={list(multiscale_flip)} is the segmentation papers' MF inference; "
                          f"the checkpoint's head is {cfg.head.get('task')}, expected segmentation (or null).")
    device = dist.init_from_env()
    model.to(device)
    val_set = instantiate(cfg.dataset.val)
    loader = build_loader(val_set, batch_size, False, num_workers, 0)
    evaluator = val_set.evaluator()
    metrics = run_evaluation(model, loader, evaluator, device, progress=progress, multiscale_flip=multiscale_flip)
    if dist.is_main():
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if hasattr(evaluator, "write_results"):
            evaluator.write_results(run_dir / "detections.json")
    return metrics


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = HydraConfig.get().runtime.output_dir
    metrics = evaluate_checkpoint(cfg.checkpoint, run_dir, cfg.dataset.root, cfg.batch_size,
                                  cfg.num_workers, cfg.progress, cfg.multiscale_flip, cfg.get("runtime", "pytorch"),
                                  cfg.get("artifact"), cfg.threads)
    if dist.is_main():
        print(", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k))
        print(f"metrics written to {Path(run_dir) / 'metrics.json'}")


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "evaluate")


if __name__ == "__main__":
    cli()
