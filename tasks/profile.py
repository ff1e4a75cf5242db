"""Profile a backbone (as the papers' ImageNet classifier) or a whole model.

    python -m tasks.profile backbone=mobilenet_v1 backbone.width_mult=0.5 input_size=224
    python -m tasks.profile head=ssdlite input_size=320
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tasks.analysis.complexity import (
    LAYER_TYPES,
    count_complexity,
    cpu_latency_ms,
    eager_peak_memory,
    materialized_memory,
)
from tasks.cli import CONFIG_DIR, run
from tasks.training.model import build_model

DEFAULT_CLASSES = {None: 1000, "detection": 80, "segmentation": 21}


def profile(cfg: DictConfig) -> dict:
    head_cfg = cfg.get("head")
    task = head_cfg.get("task") if head_cfg is not None else None
    num_classes = cfg.num_classes if cfg.num_classes is not None else DEFAULT_CLASSES[task]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg.backbone, head_cfg, num_classes).eval()
    images = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size)

    complexity = count_complexity(model, images)
    memory = materialized_memory(model, images, cfg.bytes_per_element)
    report = {
        "model": {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
                  "head": None if head_cfg is None else OmegaConf.to_container(head_cfg, resolve=True),
                  "num_classes": num_classes},
        "input_size": cfg.input_size,
        "params": complexity.params,
        "madds": complexity.madds,
        "by_layer_type": {t: {"madds": complexity.madds_by_type[t], "params": complexity.params_by_type[t],
                              "madds_pct": share[0], "params_pct": share[1]}
                          for t, share in complexity.share().items()},
        "materialized_memory": [{"size": f"{h}x{w}", "channels": c, "kbytes": b / 1000}
                                for (h, w), (c, b) in memory.items()],
        "materialized_memory_max_kbytes": max(b for _, b in memory.values()) / 1000,
        "eager_peak_activation_kbytes_fp32": eager_peak_memory(model, images) / 1000,
        "cpu_latency_ms_median": cpu_latency_ms(model, images, cfg.latency_runs, cfg.warmup_runs),
        "batch_size": cfg.batch_size,
        "bytes_per_element": cfg.bytes_per_element,
        "threads": torch.get_num_threads(),
    }
    return report


def format_report(report: dict) -> str:
    backbone = report["model"]["backbone"]
    head = report["model"]["head"]
    name = backbone["_target_"].rsplit(".", 1)[-1] + f" x{backbone['width_mult']}"
    name += f" + {head['_target_'].rsplit('.', 1)[-1]}" if head else " (ImageNet classifier)"
    lines = [f"{name} at {report['input_size']}x{report['input_size']}, {report['model']['num_classes']} classes",
             f"  MAdds  {report['madds'] / 1e6:10.1f} M",
             f"  params {report['params'] / 1e6:10.3f} M",
             "",
             f"  {'layer type':<16}{'MAdds %':>10}{'params %':>10}"]
    for t in LAYER_TYPES:
        row = report["by_layer_type"][t]
        lines.append(f"  {t:<16}{row['madds_pct']:>10.2f}{row['params_pct']:>10.2f}")
    lines += ["", f"  materialised activations ({8 * report['bytes_per_element']}-bit, MobileNetV2 Table 3 measure)",
              f"  {'size':<10}{'channels':>10}{'Kb':>10}"]
    for row in report["materialized_memory"]:
        lines.append(f"  {row['size']:<10}{row['channels']:>10}{row['kbytes']:>10.0f}")
    lines += [f"  {'max':<10}{'':>10}{report['materialized_memory_max_kbytes']:>10.0f}",
              f"  peak held by eager PyTorch (fp32): {report['eager_peak_activation_kbytes_fp32']:.0f} Kb",
              f"  CPU latency (median, batch {report['batch_size']}, {report['threads']} threads): "
              f"{report['cpu_latency_ms_median']:.1f} ms"]
    return "\n".join(lines)


@hydra.main(config_path=CONFIG_DIR, config_name="profile", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    report = profile(cfg)
    print(format_report(report))
    out = Path(HydraConfig.get().runtime.output_dir) / cfg.output_json
    out.write_text(json.dumps(report, indent=2))
    print(f"  written to {out}")
    return report


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "profile")


if __name__ == "__main__":
    cli()
