"""Deployment table: each on-device runtime x precision, latency at batch 1, file size, metric change.

    python -m benchmarks.mobile                      # SSDLite-MNv2 @320 and Mobile DeepLabv3 @513, random weights
    python -m benchmarks.mobile --quick              # few repeats: checks that everything runs
    python -m benchmarks.mobile --checkpoint det.ckpt --checkpoint seg.ckpt   # + metric change on their val split

Needs mobilevision[mobile] (`make bench-mobile` runs it in .venv-mobile). Paths, timed in interleaved rounds
(benchmarks/timing.py) on the same image, network forward plus the post-processing the graph holds:
PyTorch eager fp32 (the reference), ONNX Runtime fp32, LiteRT fp32 / int8 (litert-torch, XNNPACK delegate),
ExecuTorch fp32 / int8 (XNNPACK); torchvision's nearest networks (MobileNetV3-Large SSDLite320 and
DeepLabv3, raw outputs: torchvision has neither on MobileNetV2) go through the same converters as peers. The
latency part uses the papers' networks at full size with random
weights (int8 calibrated on random images: the latency does not depend on the values); the metric part
exports the given checkpoints the same way (int8 calibrated on training images) and evaluates every file
with tasks.evaluate's evaluator on the checkpoint's val split. A conversion that fails is a row with its error.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.deploy.fold_bn import fold_batchnorm
from tasks.deploy.mobile_export import export_mobile_model
from tasks.deploy.onnx_export import export_model
from tasks.deploy.runner import load_deployed
from tasks.training.model import build_model

from .deploy import DeploySettings, model_config
from .timing import interleaved, summarise

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "outputs" / "bench" / "mobile.json"
PATHS = (  # (label, format, precision, runtime)
    ("ONNX Runtime fp32", "onnx", "fp32", "onnxruntime"),
    ("LiteRT fp32", "tflite", "fp32", "litert"),
    ("LiteRT int8", "tflite", "int8", "litert"),
    ("ExecuTorch XNNPACK fp32", "executorch", "fp32", "executorch"),
    ("ExecuTorch XNNPACK int8", "executorch", "int8", "executorch"),
)
EAGER = "PyTorch eager fp32"
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "executorch": ".pte"}


def file_mb(path: Path) -> float:
    return path.stat().st_size / 2 ** 20


def export_path(model, cfg, fmt: str, precision: str, out: Path, calibration, check: bool) -> Path:
    if fmt == "onnx":
        return export_model(model, cfg, out, check=check)
    return export_mobile_model(model, cfg, fmt, out, precision, check=check, calibration=calibration)


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


class TorchvisionPeer(nn.Module):
    """torchvision's nearest network, raw outputs only (its own pre/post-processing is Python, not exportable):
    SSDLite320-MobileNetV3-Large backbone + head, or DeepLabv3-MobileNetV3-Large's `out` logits.
    torchvision has no SSDLite or Mobile DeepLabv3 on MobileNetV2."""

    def __init__(self, task: str, classes: int):  # object classes (detection) / with background (segmentation)
        super().__init__()
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

        self.task = task
        if task == "detection":
            net = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes + 1)
            self.backbone, self.head = net.backbone, net.head
            self.output_names = ["cls_logits", "bbox_regression"]
        else:
            self.net = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes,
                                                    aux_loss=False)
            self.output_names = ["logits"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.task == "detection":
            out = self.head(list(self.backbone(images).values()))
            return out["cls_logits"], out["bbox_regression"]
        return (self.net(images)["out"],)


def export_peer(peer: TorchvisionPeer, fmt: str, precision: str, path: Path, example: torch.Tensor,
                calibration: Sequence[torch.Tensor], threads: int):
    """The peer through the same converters; returns its runner."""
    meta = {"task": peer.task, "input_size": list(example.shape[-2:]), "output_names": peer.output_names,
            "class_names": []}
    if fmt == "onnx":
        from tasks.deploy.onnx_export import quiet_exporter
        from tasks.deploy.onnx_runtime import OnnxModel

        with quiet_exporter():
            torch.onnx.export(peer, (example,), path, input_names=["images"], output_names=peer.output_names,
                              opset_version=18, dynamo=True, external_data=False)
        return OnnxModel(path, threads=threads, metadata=meta), path
    if fmt == "tflite":
        from tasks.deploy.litert import LiteRTModel, convert_litert

        convert_litert(peer, example, path, precision, calibration)
        return LiteRTModel(path, threads=threads, metadata=meta), path
    from tasks.deploy.executorch import ExecuTorchModel, convert_executorch

    convert_executorch(peer, example, path, precision, calibration)
    return ExecuTorchModel(path, threads=threads, metadata=meta), path


def latency_section(tasks: Sequence[str], repeats: int, warmup: int, calibration_images: int, threads: int,
                    workdir: Path, log: Callable[[str], None], peers: bool = True) -> list[dict[str, Any]]:
    rows = []
    settings = DeploySettings()
    for task in tasks:
        cfg = model_config(task, settings)
        torch.manual_seed(0)
        model = build_model(cfg.backbone, cfg.head, int(cfg.dataset.num_classes)).eval()
        size = int(cfg.dataset.input_size)
        generator = torch.Generator().manual_seed(0)
        image = torch.randn(1, 3, size, size, generator=generator)
        calibration = [torch.randn(3, size, size, generator=generator) for _ in range(calibration_images)]
        name = f"{'SSDLite-MobileNetV2' if task == 'detection' else 'Mobile DeepLabv3 (MNetV2*, OS16)'} @ {size}"

        @torch.no_grad()
        def eager(model=model, image=image):
            return model(image)

        x = image.numpy()
        calls: dict[str, Callable[[], object]] = {EAGER: eager}
        info: dict[str, dict[str, Any]] = {EAGER: {"size_mb": None, "error": None}}
        for label, fmt, precision, runtime in PATHS:
            start = time.perf_counter()
            try:
                path = export_path(model, cfg, fmt, precision, workdir / f"{task}_{precision}{SUFFIX[fmt]}",
                                   calibration, check=False)
                runner = load_deployed(path, runtime, threads)
                runner.run(x)  # a file that converts but does not run is an error row, not a crash in the timing
                calls[label] = lambda runner=runner, x=x: runner.run(x)
                info[label] = {"size_mb": file_mb(path), "error": None,
                               "convert_s": round(time.perf_counter() - start, 1)}
                log(f"mobile: {name}: {label} converted in {info[label]['convert_s']:.0f} s, "
                    f"{info[label]['size_mb']:.2f} MB")
            except Exception as err:  # noqa: BLE001 - one failing converter must not hide the others
                info[label] = {"size_mb": None, "error": _first_line(err)}
                log(f"mobile: {name}: {label} FAILED: {info[label]['error']}")
        samples = interleaved(calls, repeats, warmup)
        for label in info:
            times = samples.get(label)
            rows.append({"model": name, "task": task, "path": label, "threads": threads,
                         "time_ms": summarise(times).as_dict() if times else None, **info[label]})
            if times:  # as soon as measured: a long run stopped later still leaves these figures
                log(f"mobile: {name}: {label}: median {summarise(times).median:.1f} ms, {threads} threads")
        del calls
        if peers:
            rows += peer_rows(task, int(cfg.dataset.num_classes), image, calibration,
                              repeats, warmup, threads, workdir, log)
    return rows


def peer_rows(task: str, classes: int, image: torch.Tensor, calibration, repeats: int, warmup: int, threads: int,
              workdir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    peer = fold_batchnorm(TorchvisionPeer(task, classes).eval()).eval()
    size = image.shape[-1]
    name = (f"torchvision {'SSDLite320-MobileNetV3-Large' if task == 'detection' else 'DeepLabv3-MobileNetV3-Large'}"
            f" @ {size}")

    @torch.no_grad()
    def eager():
        return peer(image)

    x = image.numpy()
    calls: dict[str, Callable[[], object]] = {EAGER: eager}
    info: dict[str, dict[str, Any]] = {EAGER: {"size_mb": None, "error": None}}
    for label, fmt, precision, _ in PATHS:
        try:
            runner, path = export_peer(peer, fmt, precision, workdir / f"peer_{task}_{precision}{SUFFIX[fmt]}", image,
                                       calibration, threads)
            runner.run(x)
            calls[label] = lambda runner=runner, x=x: runner.run(x)
            info[label] = {"size_mb": file_mb(path), "error": None}
            log(f"mobile: {name}: {label} converted, {info[label]['size_mb']:.2f} MB")
        except Exception as err:  # noqa: BLE001
            info[label] = {"size_mb": None, "error": _first_line(err)}
            log(f"mobile: {name}: {label} FAILED: {info[label]['error']}")
    samples = interleaved(calls, repeats, warmup)
    return [{"model": name, "task": task, "path": label, "threads": threads, "peer": True,
             "time_ms": summarise(samples[label]).as_dict() if label in samples else None, **info[label]}
            for label in info]


def metric_section(checkpoints: Sequence[str], calibration_images: int, threads: int, workdir: Path,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    from tasks.deploy.mobile_export import calibration_images as training_images
    from tasks.evaluate import evaluate_checkpoint
    from tasks.training.trained import load_trained_model

    rows = []
    for index, checkpoint in enumerate(checkpoints):
        model, cfg = load_trained_model(checkpoint)
        reference = evaluate_checkpoint(checkpoint, workdir / f"eval{index}", num_workers=0, progress=False)
        primary = next(iter(reference))
        rows.append({"checkpoint": str(checkpoint), "path": EAGER, "metric": primary,
                     "value": reference[primary], "change": 0.0, "error": None})
        calibration = training_images(cfg, calibration_images)
        for label, fmt, precision, runtime in PATHS:
            try:
                path = export_path(model, cfg, fmt, precision, workdir / f"ckpt{index}_{precision}{SUFFIX[fmt]}",
                                   calibration, check=False)
                metrics = evaluate_checkpoint(None, workdir / f"eval{index}_{label}", num_workers=0, progress=False,
                                              runtime=runtime, artifact=path, threads=threads)
                rows.append({"checkpoint": str(checkpoint), "path": label, "metric": primary,
                             "value": metrics[primary], "change": metrics[primary] - reference[primary],
                             "size_mb": file_mb(path), "error": None})
            except Exception as err:  # noqa: BLE001
                rows.append({"checkpoint": str(checkpoint), "path": label, "metric": primary, "value": None,
                             "change": None, "error": _first_line(err)})
            row = rows[-1]
            log(f"mobile: {checkpoint}: {label}: " + (row["error"] or f"{primary}={row['value']:.4f} "
                                                                    f"({row['change']:+.4f})"))
    return rows


def format_table(results: dict[str, Any]) -> str:
    lines = [f"deployment: latency at batch 1 (median of {results['repeats']} interleaved rounds, "
             f"{results['threads']} threads), file size; random weights"]
    header = f"{'model':<42} {'path':<26} {'median ms':>9} {'IQR ms':>7} {'size MB':>8}  note"
    lines += [header, "-" * len(header)]
    for row in results["latency"]:
        t = row["time_ms"]
        size = f"{row['size_mb']:.2f}" if row["size_mb"] is not None else "-"
        timing = f"{t['median']:>9.1f} {t['iqr']:>7.1f}" if t else f"{'-':>9} {'-':>7}"
        lines.append(f"{row['model']:<42} {row['path']:<26} {timing} {size:>8}  {row['error'] or ''}")
    if results.get("metrics"):
        lines += ["", "metric change vs PyTorch fp32 on the checkpoint's val split (same evaluator)"]
        header = f"{'checkpoint':<40} {'path':<26} {'metric':>8} {'value':>8} {'change':>8}  note"
        lines += [header, "-" * len(header)]
        for row in results["metrics"]:
            value = f"{row['value']:.4f}" if row["value"] is not None else "-"
            change = f"{row['change']:+.4f}" if row["change"] is not None else "-"
            checkpoint = Path(row["checkpoint"])  # with its folder: every run names its checkpoint best.ckpt
            name = f"{checkpoint.parent.name}/{checkpoint.name}"
            lines.append(f"{name:<40} {row['path']:<26} {row['metric']:>8} {value:>8} "
                         f"{change:>8}  {row['error'] or ''}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mobile", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: checks that it runs, figures are noise")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=("detection", "segmentation"), action="append")
    parser.add_argument("--checkpoint", action="append", default=[], help="also measure the metric change")
    parser.add_argument("--no-latency", action="store_true", help="only the metric part (needs --checkpoint)")
    parser.add_argument("--no-peers", action="store_true", help="without torchvision's networks")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 20, --quick 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats, warmup = (3, 1) if args.quick else (20, 3)
    repeats = args.repeats or repeats
    results: dict[str, Any] = {"threads": args.threads, "repeats": repeats, "torch": torch.__version__,
                               "latency": [], "metrics": []}
    with tempfile.TemporaryDirectory(prefix="mobilevision-bench-mobile-") as tmp:
        if not args.no_latency:
            results["latency"] = latency_section(args.only or ("detection", "segmentation"), repeats, warmup,
                                                 2 if args.quick else 8, args.threads, Path(tmp), print,
                                                 peers=not args.no_peers)
        if args.checkpoint:
            results["metrics"] = metric_section(args.checkpoint, 8 if args.quick else 32, args.threads,
                                                Path(tmp), print)
    print(format_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
