"""Post-training static INT8 quantization for CPUs (behind `python -m tasks.quantize`).

The checkpoint is exported to fp32 ONNX (BatchNorm folded), cut back to its raw outputs (an SSDLite graph's
decode_in_graph outputs go, so that no quantization step lands on the scores or boxes: the INT8 model is
decoded from its logits in Python), pre-processed (shape inference + graph optimisation), then quantized
by ONNX Runtime's `quantize_static`: QDQ format, int8 weights per output channel, uint8 activations whose
ranges come from N training images passed through the val transforms.
Both models are then measured the same way: latency (median of `latency_runs` runs at batch 1) and the
dataset's own metric on its val split through tasks.training.evaluation.evaluate. The comparison is printed as a table
and written to quantize.json; an INT8 metric more than `max_metric_drop` below fp32 is flagged loudly.
"""
from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from tasks.deploy.in_graph import DECODED_OUTPUTS
from tasks.deploy.onnx_export import export_model
from tasks.deploy.onnx_runtime import OnnxModel
from tasks.deploy.sidecar import read_sidecar, sidecar_path, write_json
from tasks.errors import ConfigError
from tasks.resolve import check_file_config, instantiate_from_file
from tasks.training.evaluation import evaluate
from tasks.training.loaders import build_loader
from tasks.training.trained import load_trained_model, rebase_dataset_root

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class QuantizationAccuracyError(ValueError):
    """INT8 lost more of the metric than allowed and fail_on_drop is set."""


# -- data ----------------------------------------------------------------------------------------
def split_with_val_transforms(cfg: DictConfig, split: str, source: str = "the model's config",
                              trusted: Sequence[str] = ()) -> Dataset:
    """The `split` dataset of the config with the val transforms (deterministic, model-sized inputs)."""
    node = OmegaConf.to_container(cfg.dataset[split], resolve=True)
    node["transforms"] = OmegaConf.to_container(cfg.dataset.val.transforms, resolve=True)
    return instantiate_from_file(node, source, trusted)


def calibration_config(cfg: DictConfig, out_dir: Path, dataset_root: str | None) -> DictConfig:
    """Where the calibration and evaluation data are read: `dataset_root` when given; a dataset the config
    can write itself (the built-in shapes) is written under the run directory, never into the current
    folder; any other stays where the checkpoint says."""
    if dataset_root is not None:
        return rebase_dataset_root(cfg, dataset_root)
    if cfg.dataset.get("prepare") is not None:
        cfg = rebase_dataset_root(cfg, str((out_dir / "calibration_data").absolute()))
        if "root" in cfg.dataset.prepare:
            cfg.dataset.prepare.root = cfg.dataset.root  # the writer writes there and nowhere else
    return cfg


class ImageCalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader over dataset images, one per batch."""

    def __init__(self, dataset: Dataset, indices: list[int], input_name: str):
        self.dataset, self.indices, self.input_name = dataset, indices, input_name
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        index = next(self._iter, None)
        if index is None:
            return None
        image = self.dataset[index][0]
        return {self.input_name: image[None].numpy().astype(np.float32)}

    def rewind(self) -> None:
        self._iter = iter(self.indices)


def _as_reader(reader: ImageCalibrationReader):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

        def rewind(self):
            reader.rewind()

    return Reader()


# -- quantization --------------------------------------------------------------------------------
def quantize_onnx(fp32_path: Path, int8_path: Path, reader: ImageCalibrationReader, method: str = "minmax",
                  per_channel: bool = True) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibrate_method={method} is not allowed; expected one of "
                          f"{', '.join(CALIBRATION_METHODS)}.")
    calibration_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                          "percentile": CalibrationMethod.Percentile}[method]
    prepared = int8_path.with_name(f"{int8_path.stem}.prep.onnx")
    raw = int8_path.with_name(f"{int8_path.stem}.raw.onnx")
    ort_log = logging.getLogger("onnxruntime")
    previous = ort_log.level
    ort_log.setLevel(max(previous, logging.WARNING))  # it logs every pre-processing pass at INFO
    try:
        fp32_path = _without_decoded_outputs(fp32_path, raw)
        try:
            quant_pre_process(str(fp32_path), str(prepared))
            source = prepared
        except Exception as err:  # noqa: BLE001 - pre-processing only helps; quantize the plain export
            log.warning("ONNX Runtime's quantization pre-processing failed (%s); quantizing the plain export", err)
            source = fp32_path
        quantize_static(str(source), str(int8_path), _as_reader(reader), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calibration_method, extra_options={"WeightSymmetric": True})
    finally:
        prepared.unlink(missing_ok=True)
        raw.unlink(missing_ok=True)
        ort_log.setLevel(previous)
    return int8_path


def _without_decoded_outputs(path: Path, raw: Path) -> Path:
    """`path`, or its graph cut back to the raw outputs (written to `raw`) if it ends in DECODED_OUTPUTS: those
    outputs and the nodes only they need go (`anchors` is a constant, which onnx.utils.extract_model refuses)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    kept_outputs = [o for o in graph.output if o.name not in DECODED_OUTPUTS]
    if len(kept_outputs) == len(graph.output):
        return path
    needed = {o.name for o in kept_outputs}
    kept_nodes = []
    for node in reversed(graph.node):
        if needed & set(node.output):
            kept_nodes.append(node)
            needed |= set(node.input)
    del graph.output[:]
    graph.output.extend(kept_outputs)
    del graph.node[:]
    graph.node.extend(reversed(kept_nodes))
    onnx.save(model, str(raw))
    return raw


def _raw_outputs_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar entries that describe the outputs, for the INT8 graph (no DECODED_OUTPUTS)."""
    names = [n for n in meta.get("output_names") or [] if n not in DECODED_OUTPUTS]
    shapes = {n: s for n, s in (meta.get("output_shapes") or {}).items() if n not in DECODED_OUTPUTS}
    return {"output_names": names, "output_shapes": shapes, "decode_in_graph": False}


# -- measurements --------------------------------------------------------------------------------
def median_latency_ms(model: OnnxModel, image: np.ndarray, runs: int, warmup: int) -> float:
    x = np.ascontiguousarray(image[None], dtype=np.float32)
    for _ in range(warmup):
        model.run(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(x)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def output_agreement(fp32: OnnxModel, int8: OnnxModel, images: list[np.ndarray]) -> dict[str, float]:
    """Pearson correlation of every batched output, and how often the class argmax agrees (classes are
    the last axis of cls_logits, axis 1 of segmentation logits)."""
    collected: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for image in images:
        a, b = fp32.run(image[None]), int8.run(image[None])
        for name in a:
            if name != "anchors" and name in b:  # the INT8 graph has no decode_in_graph outputs
                collected.setdefault(name, []).append((a[name], b[name]))
    report: dict[str, float] = {}
    for name, pairs in collected.items():
        a = np.concatenate([p[0] for p in pairs])
        b = np.concatenate([p[1] for p in pairs])
        report[f"{name}/correlation"] = float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])
        axis = {"cls_logits": -1, "logits": 1}.get(name)
        if axis is not None:
            report[f"{name}/argmax_agreement"] = float((a.argmax(axis) == b.argmax(axis)).mean())
    return report


def _model_size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def format_table(report: dict[str, Any]) -> str:
    metric = report["metric"]
    fp32, int8 = report["fp32"], report["int8"]
    rows = [("model", f"latency ms (median of {report['latency_runs']}, batch 1)", metric, "size MB"),
            ("fp32 onnxruntime", f"{fp32['latency_ms']:.3f}", f"{fp32['metric']:.4f}", f"{fp32['size_mb']:.2f}"),
            ("int8 onnxruntime (QDQ)", f"{int8['latency_ms']:.3f}", f"{int8['metric']:.4f}",
             f"{int8['size_mb']:.2f}"),
            ("change", f"{report['speedup']:.2f}x faster" if report["speedup"] >= 1 else
             f"{1 / report['speedup']:.2f}x slower", f"{-report['metric_drop']:+.4f}",
             f"{int8['size_mb'] / fp32['size_mb']:.2f}x")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def loud_warning(report: dict[str, Any]) -> str:
    bar = "!" * 100
    return (f"{bar}\nWARNING: INT8 LOSES {report['metric_drop']:.4f} {report['metric']} "
            f"({report['fp32']['metric']:.4f} -> {report['int8']['metric']:.4f}), MORE THAN "
            f"max_metric_drop={report['max_metric_drop']}.\nDo not ship {report['int8']['path']} without a "
            f"closer look: try more calibration_images, calibrate_method=entropy or percentile, or keep fp32.\n"
            f"{bar}")


def quantize_checkpoint(checkpoint: str | Path | None, out_dir: str | Path, calibration_images: int = 64,
                        calibrate_method: str = "minmax", per_channel: bool = True, latency_runs: int = 50,
                        warmup_runs: int = 5, max_metric_drop: float = 0.01, max_eval_images: int | None = None,
                        eval_batch_size: int = 8, agreement_images: int = 8, dataset_root: str | None = None,
                        threads: int | None = None, seed: int = 0, opset: int = 18, progress: bool = False,
                        onnx: str | Path | None = None, trusted_targets: Sequence[str] = ()) -> dict[str, Any]:
    """Export (or take the fp32 `onnx` already exported), quantize, measure; returns the comparison and
    writes it to quantize.json."""
    if calibration_images < 1:
        raise ConfigError(f"calibration_images={calibration_images} must be a positive integer.")
    if latency_runs < 1:
        raise ConfigError(f"latency_runs={latency_runs} must be a positive integer.")
    out_dir = Path(out_dir)
    if (out_dir / "quantize.json").exists():
        raise ConfigError(f"output_dir={out_dir} already holds the quantize.json of an earlier run; choose another "
                          f"output_dir (or leave it unset for a fresh run folder).")
    out_dir.mkdir(parents=True, exist_ok=True)
    if onnx is not None:
        fp32_path = Path(onnx)
        meta = read_sidecar(fp32_path)
        if not meta.get("train_config"):
            raise ValueError(f"{sidecar_path(fp32_path)} carries no train_config; expected a sidecar written "
                             f"by tasks.export (it names the dataset to calibrate and evaluate on).")
        source = f"ONNX sidecar {sidecar_path(fp32_path)}"
        check_file_config(meta["train_config"].get("dataset") or {}, source, trusted_targets, "dataset")
        cfg = calibration_config(OmegaConf.create(meta["train_config"]), out_dir, dataset_root)
    elif checkpoint is not None:
        source = f"checkpoint {checkpoint}"
        model, cfg = load_trained_model(checkpoint, trusted=trusted_targets)
        cfg = calibration_config(cfg, out_dir, dataset_root)
    else:
        raise ConfigError("tasks.quantize needs checkpoint=<tasks.train checkpoint> or onnx=<exported model.onnx>.")
    if cfg.dataset.get("prepare") is not None:
        instantiate_from_file(cfg.dataset.prepare, source, trusted_targets)
    if onnx is None:  # class names and category ids come from the checkpoint's artifact
        fp32_path = export_model(model, cfg, out_dir / "model.onnx", opset=opset, source=str(checkpoint))
        meta = read_sidecar(fp32_path)
    train_set = split_with_val_transforms(cfg, "train", source, trusted_targets)
    count = min(calibration_images, len(train_set))
    if count < calibration_images:
        log.warning("calibration_images=%d but the training split has %d images; using all of them",
                    calibration_images, len(train_set))
    indices = sorted(random.Random(seed).sample(range(len(train_set)), count))
    reader = ImageCalibrationReader(train_set, indices, meta["input_name"])
    int8_path = quantize_onnx(fp32_path, out_dir / f"{fp32_path.stem}.int8.onnx", reader, calibrate_method, per_channel)
    int8_meta = meta | _raw_outputs_meta(meta)
    int8_meta |= {"quantization": {"format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8",
                                   "activations": "uint8", "calibrate_method": calibrate_method,
                                   "calibration_images": count, "source": fp32_path.name}}
    write_json(int8_meta, sidecar_path(int8_path))

    fp32, int8 = OnnxModel(fp32_path, threads=threads), OnnxModel(int8_path, threads=threads)
    val_set = instantiate_from_file(cfg.dataset.val, source, trusted_targets)
    if max_eval_images is not None and max_eval_images < len(val_set):
        val_set = Subset(val_set, range(max_eval_images))
    loader = build_loader(val_set, eval_batch_size, False, 0, seed)
    evaluator_of = val_set.dataset.evaluator if isinstance(val_set, Subset) else val_set.evaluator
    primary = evaluator_of().primary
    samples = [val_set[i][0].numpy() for i in range(min(max(agreement_images, 1), len(val_set)))]
    report: dict[str, Any] = {"task": meta["task"], "metric": primary, "latency_runs": latency_runs,
                              "threads": threads, "eval_images": len(val_set)}
    for name, runner, path in (("fp32", fp32, fp32_path), ("int8", int8, int8_path)):
        metrics = evaluate(runner, loader, evaluator_of(), torch.device("cpu"), progress=progress)
        report[name] = {"path": str(path), "size_mb": _model_size_mb(path), "metric": float(metrics[primary]),
                        "metrics": {k: float(v) for k, v in metrics.items()},
                        "latency_ms": median_latency_ms(runner, samples[0], latency_runs, warmup_runs)}
    report["speedup"] = report["fp32"]["latency_ms"] / max(report["int8"]["latency_ms"], 1e-9)
    report["metric_drop"] = report["fp32"]["metric"] - report["int8"]["metric"]
    report["max_metric_drop"] = float(max_metric_drop)
    report["within_tolerance"] = bool(report["metric_drop"] <= max_metric_drop)
    report["agreement"] = output_agreement(fp32, int8, samples)
    report["calibration"] = {"images": count, "method": calibrate_method, "per_channel": per_channel,
                             "split": "train", "seed": seed}
    write_json(report, out_dir / "quantize.json")
    return report
