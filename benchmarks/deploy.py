"""Deployment paths per model: batch-1 latency and achieved multiply-adds per second against a matmul peak.

Paths, timed in the same interleaved rounds (benchmarks/timing.py), network forward only:
1. PyTorch eager, fp32, NCHW (the model as trained);
2. PyTorch eager after tasks.deploy.fold_bn.fold_batchnorm, weights and input in channels_last;
3. ONNX Runtime fp32 on tasks.deploy.onnx_export.export_model's file (BN folded there too), CPUExecutionProvider;
4. ONNX Runtime INT8: tasks.deploy.int8.quantize_onnx (static QDQ, int8 per-channel weights, uint8
   activations) calibrated on a few random normal images (the models have random weights: the
   latency does not depend on the values, the INT8 accuracy would, and is not measured here).
SSDLite also gets one row with its postprocessing (ONNX Runtime fp32 + tasks.deploy.onnx_runtime.decode_detections).
The fp32 file is exported with decode_in_graph=false: the network alone, like for like with the other paths;
benchmarks/postprocess.py times the default export, whose graph ends in the dense part of the decoding.

Achieved MAdds/s = the model's MAdds (tasks.analysis.complexity.count_complexity: conv + linear multiply-adds per
image) / the path's median time; the peak is torch.mm on two size x size fp32 matrices with the same
threads (size^3 multiply-adds per call, median time). INT8 paths can pass 100 %: the peak is fp32's.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tasks.analysis.complexity import count_complexity
from tasks.deploy.fold_bn import fold_batchnorm
from tasks.deploy.int8 import ImageCalibrationReader, quantize_onnx
from tasks.deploy.onnx_export import export_model
from tasks.deploy.onnx_runtime import decode_detections
from tasks.deploy.sidecar import read_sidecar
from tasks.training.model import build_model

from .timing import interleaved, paired_ratio, summarise

CONF = Path(__file__).resolve().parents[1] / "conf"
DETECTION = "SSDLite-MobileNetV2"
SEGMENTATION = "Mobile DeepLabv3 (MNetV2* OS16, light head)"
EAGER = "PyTorch eager fp32 NCHW"
FOLDED = "PyTorch BN folded + channels_last"
ORT_FP32 = "ONNX Runtime fp32"
ORT_INT8 = "ONNX Runtime INT8 (static QDQ)"
ORT_POST = "ONNX Runtime fp32 + postprocess"
PATHS = (EAGER, FOLDED, ORT_FP32, ORT_INT8)


@dataclass(frozen=True)
class DeploySettings:
    models: tuple[str, ...] = ("detection", "segmentation")
    detection_size: int = 320
    detection_classes: int = 80  # object classes (COCO), background added by the head
    segmentation_size: int = 513
    segmentation_classes: int = 21  # with background (VOC)
    width_mult: float = 1.0
    repeats: int = 20  # interleaved rounds per model
    warmup: int = 2
    postprocess: bool = True  # the SSDLite row with decoding + NMS
    peak_size: int = 2048
    peak_repeats: int = 8
    peak_warmup: int = 2
    calibration_images: int = 8  # random normal images
    opset: int = 18
    dynamo: bool = True  # tasks.export's default exporter
    # ONNX Runtime's idle threads spin after a call by default; interleaved, a session's spinning threads took
    # cores from the next contender (2 cores, 2 threads: INT8 SSDLite 16-17 ms with spinning, 6-8 ms without).
    ort_spinning: bool = False
    seed: int = 0


def model_config(task: str, s: DeploySettings) -> DictConfig:
    """The training config's model and dataset parts, as tasks.export reads them (export_model needs them
    for the sidecar: task, input size, class names, the head's decoding settings)."""
    backbone = OmegaConf.load(CONF / "backbone" / "mobilenet_v2.yaml")
    backbone.width_mult = s.width_mult
    if task == "detection":  # the TF box set (reduced_first_map: true), as conf/head/ssdlite.yaml has it
        head = OmegaConf.load(CONF / "head" / "ssdlite.yaml")
        size, classes = s.detection_size, s.detection_classes
    else:  # MobileNetV2 paper, Table 7: MNet V2* (no 1280 conv) at output stride 16, light head
        backbone.output_stride, backbone.last_conv = 16, False
        head, size, classes = (OmegaConf.load(CONF / "head" / "deeplabv3.yaml"), s.segmentation_size,
                               s.segmentation_classes)
    # export_model reads class names from an instantiated val set; this stands in for one without files
    val = {"_target_": "types.SimpleNamespace", "class_names": [f"class_{i}" for i in range(classes)]}
    return OmegaConf.create({"backbone": backbone, "head": head, "dataset": {
        "task": task, "input_size": size, "num_classes": classes, "val": val}})


def matmul_peak(size: int, repeats: int, warmup: int, seed: int) -> dict:
    """torch.mm on two fp32 size x size matrices: size^3 multiply-adds per call, median of `repeats`."""
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    samples = interleaved({"mm": lambda: torch.mm(a, b)}, repeats, warmup)["mm"]
    summary = summarise(samples)
    return {"size": size, "threads": torch.get_num_threads(), "time_ms": summary.as_dict(),
            "samples_ms": samples, "madds_per_s": size ** 3 / (summary.median / 1e3),
            "madds_per_s_best": size ** 3 / (summary.min / 1e3)}


def ort_session(path: Path, threads: int, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the outputs of a random network can be tiny, absolute figures say little."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30)) if b.size else 0.0


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


def prepare(task: str, s: DeploySettings, workdir: Path, log=print) -> dict:
    """Model, folded model, fp32 and INT8 ONNX files, sessions, inputs and the checks that they agree."""
    cfg = model_config(task, s)
    torch.manual_seed(s.seed)
    model = build_model(cfg.backbone, cfg.head, int(cfg.dataset.num_classes)).eval()
    size = int(cfg.dataset.input_size)
    generator = torch.Generator().manual_seed(s.seed)
    images = torch.randn(1, 3, size, size, generator=generator)
    complexity = count_complexity(model, images)
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    start = time.perf_counter()
    fp32_path = export_model(model, cfg, workdir / f"{task}.onnx", opset=s.opset, dynamo=s.dynamo,
                             decode_in_graph=False)
    export_s = time.perf_counter() - start
    calibration = [(torch.randn(3, size, size, generator=generator),) for _ in range(s.calibration_images)]
    reader = ImageCalibrationReader(calibration, list(range(len(calibration))), "images")
    start = time.perf_counter()
    int8_path = quantize_onnx(fp32_path, workdir / f"{task}.int8.onnx", reader)
    quantize_s = time.perf_counter() - start
    threads = torch.get_num_threads()
    sessions = {ORT_FP32: ort_session(fp32_path, threads, s.ort_spinning),
                ORT_INT8: ort_session(int8_path, threads, s.ort_spinning)}
    meta = read_sidecar(fp32_path)

    with torch.no_grad():
        eager_out = {k: v.numpy() for k, v in model(images).items()}
        folded_out = {k: v.numpy() for k, v in folded(images_cl).items()}
    x = images.numpy()
    ort_out = {name: dict(zip(meta["output_names"], session.run(meta["output_names"], {"images": x})))
               for name, session in sessions.items()}
    batched = [n for n in meta["output_names"] if n != "anchors"]
    checks = {
        "input_size": size, "params": complexity.params, "madds": complexity.madds,
        "batchnorms_folded": int(folded.folded_batchnorms), "export_s": round(export_s, 1),
        "quantize_s": round(quantize_s, 1), "onnx_mb": fp32_path.stat().st_size / 2 ** 20,
        "int8_onnx_mb": int8_path.stat().st_size / 2 ** 20,
        "export_parity_max_abs_diff": meta["parity"]["max_abs_diff"],
        "folded_rel_diff": {n: _relative_diff(folded_out[n], eager_out[n]) for n in batched},
        "ort_fp32_rel_diff": {n: _relative_diff(ort_out[ORT_FP32][n], eager_out[n]) for n in batched},
        "int8_vs_fp32_correlation": {n: _correlation(ort_out[ORT_INT8][n], ort_out[ORT_FP32][n])
                                     for n in batched},
        "calibration": f"{len(calibration)} random normal images (random weights: for latency, not accuracy)",
    }
    worst = max(*checks["folded_rel_diff"].values(), *checks["ort_fp32_rel_diff"].values())
    if worst > 1e-3:
        raise RuntimeError(f"{task}: the folded / ONNX Runtime fp32 model differs from eager PyTorch by "
                           f"{worst:.3g} (relative); the paths would not compute the same network.")
    log(f"deploy: {task}: {complexity.params / 1e6:.2f} M params, {complexity.madds / 1e9:.3f} B MAdds at "
        f"{size}; export {export_s:.0f} s, INT8 quantization {quantize_s:.0f} s")
    return {"cfg": cfg, "model": model, "folded": folded, "images": images, "images_cl": images_cl, "x": x,
            "sessions": sessions, "meta": meta, "complexity": complexity, "checks": checks}


def contenders(task: str, p: dict, postprocess: bool) -> dict:
    model, folded, images, images_cl, x = p["model"], p["folded"], p["images"], p["images_cl"], p["x"]
    names = p["meta"]["output_names"]
    fp32, int8 = p["sessions"][ORT_FP32], p["sessions"][ORT_INT8]

    @torch.no_grad()
    def eager():
        return model(images)

    @torch.no_grad()
    def folded_cl():
        return folded(images_cl)

    calls = {EAGER: eager, FOLDED: folded_cl, ORT_FP32: lambda: fp32.run(names, {"images": x}),
             ORT_INT8: lambda: int8.run(names, {"images": x})}
    if task == "detection" and postprocess:
        sizes, settings = [tuple(x.shape[-2:])], p["meta"]["postprocess"]
        calls[ORT_POST] = lambda: decode_detections(dict(zip(names, fp32.run(names, {"images": x}))), sizes,
                                                    settings)
    return calls


def nms_candidates(p: dict) -> int:
    """How many (anchor, class) pairs reach NMS: with random weights every class scores ~1/(K+1) > 0.01,
    the worst case (K x topk_candidates)."""
    post = p["meta"]["postprocess"]
    with torch.no_grad():
        scores = p["model"](p["images"])["cls_logits"].softmax(-1)[0, :, 1:]
    return int((scores > post["score_threshold"]).sum(0).clamp(max=post["topk_candidates"]).sum())


def run(settings: DeploySettings, log=print) -> dict:
    s = settings
    unknown = set(s.models) - {"detection", "segmentation"}
    if unknown:
        raise ValueError(f"DeploySettings.models has {sorted(unknown)}; expected 'detection' and/or "
                         f"'segmentation'.")
    start = matmul_peak(s.peak_size, s.peak_repeats, s.peak_warmup, s.seed)
    log(f"deploy: torch.mm {s.peak_size}x{s.peak_size} fp32, {start['threads']} threads: "
        f"{start['madds_per_s'] / 1e9:.1f} G multiply-adds/s (median {start['time_ms']['median']:.1f} ms)")
    timed = []
    with tempfile.TemporaryDirectory(prefix="mobilevision-bench-deploy-") as tmp:
        for task in s.models:
            p = prepare(task, s, Path(tmp), log)
            name = DETECTION if task == "detection" else SEGMENTATION
            if task == "detection" and s.postprocess:
                p["checks"]["nms_candidates_per_image"] = nms_candidates(p)
            timed.append((task, name, p["checks"], p["complexity"],
                          interleaved(contenders(task, p, s.postprocess), s.repeats, s.warmup)))
            del p
    end = matmul_peak(s.peak_size, s.peak_repeats, s.peak_warmup, s.seed)
    log(f"deploy: torch.mm again after the models: {end['madds_per_s'] / 1e9:.1f} G multiply-adds/s")
    # A peak is an upper bound and a busy machine only lowers it: the better of the two measurements.
    peak = max(start, end, key=lambda m: m["madds_per_s"])
    peak = {**peak, "measured": "before the models" if peak is start else "after the models",
            "madds_per_s_before": start["madds_per_s"], "madds_per_s_after": end["madds_per_s"]}
    rows, checks = [], {}
    for task, name, task_checks, complexity, samples in timed:
        checks[task] = task_checks
        for path, times in samples.items():
            median_s = summarise(times).median / 1e3
            rows.append({
                "task": task, "model": name, "path": path, "input_size": task_checks["input_size"],
                "measure": "forward + postprocess, batch 1" if path == ORT_POST else "forward, batch 1",
                "params": complexity.params, "madds": complexity.madds, "time_ms": summarise(times).as_dict(),
                "samples_ms": times, "madds_per_s": complexity.madds / median_s,
                "percent_of_peak": 100.0 * complexity.madds / median_s / peak["madds_per_s"],
                "vs_eager": paired_ratio(times, samples[EAGER]).as_dict(),
            })
    return {"settings": asdict(s), "checks": checks, "section": {"peak": peak, "rows": rows}}


def format_table(section: dict) -> str:
    peak = section["peak"]
    header = (f"{'model @ input size':<50} {'MAdds B':>7} {'path':<33} {'median ms':>9} {'IQR ms':>7}  "
              f"{'vs eager [q1, q3]':<19} {'GMAdds/s':>8} {'% peak':>6}")
    lines = ["", f"deploy: latency at batch 1, random weights, network forward only unless the path says "
                 f"postprocess; peak = torch.mm {peak['size']}x{peak['size']} fp32 on {peak['threads']} "
                 f"threads = {peak['madds_per_s'] / 1e9:.1f} G multiply-adds/s", header, "-" * len(header)]
    model = None
    for row in section["rows"]:
        if model is not None and row["model"] != model:
            lines.append("")
        model = row["model"]
        t, r = row["time_ms"], row["vs_eager"]
        label = f"{row['model']} @ {row['input_size']}"
        ratio = "(reference)" if row["path"] == EAGER else f"{r['median']:.2f} [{r['q1']:.2f}, {r['q3']:.2f}]"
        lines.append(f"{label:<50} {row['madds'] / 1e9:>7.2f} {row['path']:<33} {t['median']:>9.1f} "
                     f"{t['iqr']:>7.1f}  {ratio:<19} {row['madds_per_s'] / 1e9:>8.2f} "
                     f"{row['percent_of_peak']:>6.1f}")
    lines.append("vs eager = path time / eager time, median of the per-round ratios (< 1: faster than "
                 "eager); % peak = (MAdds / median time) / peak")
    before, after = peak["madds_per_s_before"], peak["madds_per_s_after"]
    if abs(before - after) > 0.25 * max(before, after):
        lines.append(f"WARNING: the matmul peak moved from {before / 1e9:.1f} to {after / 1e9:.1f} G/s "
                     f"between the start and the end of this section: other work shared the machine, the "
                     f"% of peak is unreliable.")
    return "\n".join(lines)
