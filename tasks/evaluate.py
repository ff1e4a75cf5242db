"""Evaluate a checkpoint on its dataset's val split: `python -m tasks.evaluate checkpoint=...`, or a deployed
file: `python -m tasks.evaluate runtime=onnxruntime|litert|executorch artifact=model.onnx|.tflite|.pte`."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tasks.analysis.evaluation_report import for_report, normalisation, write_config, write_evaluation_report
from tasks.cli import CONFIG_DIR, run
from tasks.cpu_memory import apply_cpu_memory, check_cpu_memory
from tasks.errors import ConfigError, user_errors_exit
from tasks.resolve import instantiate_from_file
from tasks.training import distributed as dist
from tasks.training.evaluation import evaluate as run_evaluation
from tasks.training.loaders import build_loader
from tasks.training.trained import load_trained_model, rebase_dataset_root

log = logging.getLogger(__name__)


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
                        multiscale_flip: Sequence[float] | None = None,
                        trusted_targets: Sequence[str] = (), channels_last: bool = True,
                        report: bool = True, runtime: str = "pytorch", artifact: str | Path | None = None,
                        threads: int | None = None, cpu_memory: str = "reuse") -> dict[str, float]:
    """Metrics of a checkpoint (runtime=pytorch) or of a deployed `artifact` (runtime=onnxruntime|litert|
    executorch) on the val split, written to run_dir/metrics.json; with `report`, also the pictures and
    report.html (tasks/analysis/evaluation_report.py) in run_dir. `cpu_memory`: tasks/cpu_memory.py."""
    check_cpu_memory(cpu_memory)
    if runtime == "pytorch":
        if not checkpoint:
            raise ConfigError("checkpoint is required but was not given; expected checkpoint=<value> on the command "
                              "line.")
        model, cfg = load_trained_model(checkpoint, dataset_root, trusted_targets)
        source = f"checkpoint {checkpoint}"
    elif multiscale_flip:
        raise ConfigError(f"multiscale_flip runs the network at several input sizes; the deployed {runtime} "
                          f"graph has one fixed input size, so use runtime=pytorch or multiscale_flip=null.")
    elif not artifact:
        raise ConfigError(f"runtime={runtime} needs artifact=<file made by tasks.export>.")
    else:
        model, cfg = load_deployed_with_config(artifact, runtime, dataset_root, threads)
        source = f"the sidecar of {artifact}"
    if multiscale_flip and cfg.head.get("task") != "segmentation":
        raise ConfigError(f"multiscale_flip={list(multiscale_flip)} is the segmentation papers' MF inference; "
                          f"the checkpoint's head is {cfg.head.get('task')}, expected segmentation (or null).")
    device = dist.init_from_env()
    memory = apply_cpu_memory(cpu_memory, device)
    if dist.is_main():
        log.info(memory)
    if runtime == "pytorch":
        model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    val_set = instantiate_from_file(cfg.dataset.val, source, trusted_targets)
    loader = build_loader(val_set, batch_size, False, num_workers, 0)
    evaluator = val_set.evaluator()
    if report:
        evaluator = for_report(evaluator)
    metrics = run_evaluation(model, loader, evaluator, device, progress=progress, multiscale_flip=multiscale_flip,
                             channels_last=channels_last and runtime == "pytorch")
    if dist.is_main():
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if hasattr(evaluator, "write_results"):
            evaluator.write_results(run_dir / "detections.json")
        if report:
            config = OmegaConf.to_container(cfg, resolve=True)
            mean, std = normalisation(config)
            source_file = checkpoint or artifact
            write_evaluation_report(evaluator, val_set, metrics, run_dir, title=f"evaluation of {source_file}",
                                    checkpoint=source_file, config=write_config(config, run_dir / "config.yaml"),
                                    mean=mean, std=std)
    return metrics


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = HydraConfig.get().runtime.output_dir
    metrics = evaluate_checkpoint(cfg.checkpoint, run_dir, cfg.dataset.root, cfg.batch_size,
                                  cfg.num_workers, cfg.progress, cfg.multiscale_flip, list(cfg.trusted_targets),
                                  cfg.get("channels_last", True), cfg.report, cfg.get("runtime", "pytorch"),
                                  cfg.get("artifact"), cfg.threads, cfg.get("cpu_memory", "reuse"))
    if dist.is_main():
        print(", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k))
        print(f"metrics written to {Path(run_dir) / 'metrics.json'}")
        if cfg.report:
            print(f"report (tables and pictures) written to {Path(run_dir) / 'report.html'}")


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "evaluate")


if __name__ == "__main__":
    cli()
