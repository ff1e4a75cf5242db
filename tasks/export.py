"""Export a trained checkpoint to ONNX: `python -m tasks.export checkpoint=... [opset=18] [dynamo=true]`,
or to a small inference-only checkpoint: `format=weights` (tasks/deploy/weights_only.py), or for a device:
`format=tflite|executorch|coreml [precision=int8]` (tasks/deploy/mobile_export.py).

The graph and its parity check live in tasks/deploy/onnx_export.py, the sidecar in tasks/deploy/sidecar.py.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tasks.cli import CONFIG_DIR, run
from tasks.deploy.mobile_export import FORMATS as MOBILE_FORMATS
from tasks.deploy.mobile_export import export_mobile, summary_line
from tasks.deploy.onnx_export import export_checkpoint
from tasks.deploy.sidecar import read_sidecar, sidecar_path
from tasks.errors import ConfigError, user_errors_exit


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.format in MOBILE_FORMATS:  # tflite, executorch, coreml: tasks/deploy/mobile_export.py
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        output = Path(cfg.output) if cfg.output else (Path(HydraConfig.get().runtime.output_dir)
                                                      / f"model{MOBILE_FORMATS[cfg.format]}")
        path = export_mobile(cfg.checkpoint, cfg.format, output, cfg.precision, cfg.calibration_images, cfg.check,
                             trusted=list(cfg.trusted_targets), overwrite=cfg.overwrite)
        print(summary_line(path, read_sidecar(path)))
        return
    if cfg.format not in ("onnx", "weights"):
        raise ConfigError(f"format={cfg.format} is not supported; expected onnx, weights, "
                          f"{', '.join(MOBILE_FORMATS)}.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.format == "weights":
        export_weights_only(cfg)
        return
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir) / "model.onnx"
    path = export_checkpoint(cfg.checkpoint, output, cfg.opset, cfg.dynamo, cfg.upsample_logits, cfg.check,
                             cfg.nms_in_graph, trusted=list(cfg.trusted_targets), overwrite=cfg.overwrite)
    meta = read_sidecar(path)
    parity = meta.get("parity", {}).get("max_abs_diff")
    print(f"wrote {path} and {sidecar_path(path)} ({meta['task']}, input {meta['input_size']}, "
          f"opset {meta['exporter']['opset']}, {'dynamo' if meta['exporter']['dynamo'] else 'torchscript'} "
          f"exporter, {meta['batchnorms_folded']} BatchNorms folded)")
    if parity:
        print("max |onnxruntime - pytorch|: " + ", ".join(f"{k}={v:.2e}" for k, v in parity.items()))
    elif meta.get("parity"):  # nms_in_graph: final detections / label maps compared
        print(f"onnxruntime vs pytorch results: {meta['parity']}")


def export_weights_only(cfg: DictConfig) -> None:
    from tasks.deploy.weights_only import export_weights

    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir) / "model.ckpt"
    path = export_weights(cfg.checkpoint, output, list(cfg.trusted_targets), cfg.overwrite)
    print(f"wrote {path} ({path.stat().st_size} bytes; {Path(cfg.checkpoint).stat().st_size} bytes in "
          f"{cfg.checkpoint}), an inference-only checkpoint every entry point accepts")


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "export")


if __name__ == "__main__":
    cli()
