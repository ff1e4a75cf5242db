"""Post-training static INT8 quantization for CPUs: `python -m tasks.quantize checkpoint=... calibration_images=N`.

The work is in tasks/deploy/int8.py; this module reads the command line and prints the comparison.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tasks.cli import CONFIG_DIR, run
from tasks.deploy.int8 import QuantizationAccuracyError, format_table, loud_warning, quantize_checkpoint
from tasks.errors import user_errors_exit

log = logging.getLogger(__name__)


@hydra.main(config_path=CONFIG_DIR, config_name="quantize", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    report = quantize_checkpoint(cfg.checkpoint, out_dir, cfg.calibration_images, cfg.calibrate_method,
                                 cfg.per_channel, cfg.latency_runs, cfg.warmup_runs, cfg.max_metric_drop,
                                 cfg.max_eval_images, cfg.eval_batch_size, cfg.agreement_images, cfg.dataset.root,
                                 cfg.threads, cfg.seed, cfg.opset, cfg.progress, cfg.onnx,
                                 list(cfg.trusted_targets))
    print(format_table(report))
    agreement = ", ".join(f"{k}={v:.4f}" for k, v in report["agreement"].items())
    print(f"int8 vs fp32 outputs: {agreement}")
    print(f"written to {out_dir / 'quantize.json'}")
    if not report["within_tolerance"]:
        warning = loud_warning(report)
        print(warning)
        log.warning("INT8 loses %.4f %s, more than max_metric_drop=%s", report["metric_drop"], report["metric"],
                    report["max_metric_drop"])
        if cfg.fail_on_drop:
            raise QuantizationAccuracyError(
                f"INT8 loses {report['metric_drop']:.4f} {report['metric']}, more than "
                f"max_metric_drop={report['max_metric_drop']} (fail_on_drop=true).")


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "quantize")


if __name__ == "__main__":
    cli()
