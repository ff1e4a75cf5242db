"""SSDLite post-processing against the network it follows, at batch 1, in eager PyTorch and ONNX Runtime.

Each round runs every path once (order rotating, benchmarks/timing.py's scheme); a path is a network call
then the post-processing of its outputs, timed apart, so the share `post / network` is paired per round.
The post-processing runs right after its network, as in real use: a runtime whose idle threads keep the
cores busy slows what follows it, which is why ONNX Runtime is timed with spinning off (tasks.deploy's
OnnxModel default) and on. The exported graph ends in the dense part of the decoding (decode_in_graph: softmax
scores, best score per anchor, every anchor's box), so its network time includes that work; a raw-outputs export
(decode_in_graph=false, decoded from the logits in Python) runs beside it, so the cost moved into the graph
shows as the difference of the two network times.

Two score distributions, the same network time:
- random weights: an untrained classifier scores every class ~1/(K+1) > 0.01, the worst case;
- realistic: the classification logits replaced by synthesised ones shaped like a trained detector's
  (below), and the graph's scores by the same softmax of them: the network still runs, its boxes are kept.
torchvision's SSD.postprocess_detections (the same rule, without a cap) runs on the same outputs as a peer.
"""
from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD

from heads.ssdlite.box_coder import cxcywh_to_xyxy
from heads.ssdlite.postprocess import foreground_scores
from tasks.deploy.onnx_export import export_model
from tasks.deploy.onnx_runtime import OnnxModel, decode_detections
from tasks.training.model import build_model

from .timing import paired_ratio, summarise

CONF = Path(__file__).resolve().parents[1] / "conf"
EAGER = "PyTorch eager + head.predict"
PEER = "PyTorch eager + torchvision postprocess_detections"
ORT = "ONNX Runtime fp32 + decode_detections"
ORT_SPIN = "ONNX Runtime fp32 (threads spinning) + decode_detections"
ORT_RAW = "ONNX Runtime fp32 (decode_in_graph off) + decode_detections"
REGIMES = ("random weights", "realistic scores")


@dataclass(frozen=True)
class PostprocessSettings:
    input_size: int = 320
    num_classes: int = 80
    width_mult: float = 1.0
    repeats: int = 20
    warmup: int = 2
    onnx: bool = True
    dynamo: bool = True
    # realistic scores: background logit background_logit + N(0, 1), class logits N(0, 1), and `objects`
    # objects of one random class each on `anchors_per_object` anchors, their class logit raised by object_logit
    background_logit: float = 8.0
    objects: int = 5
    anchors_per_object: int = 30
    object_logit: float = 10.0
    seed: int = 0


def model_config(s: PostprocessSettings) -> DictConfig:
    backbone = OmegaConf.load(CONF / "backbone" / "mobilenet_v2.yaml")
    backbone.width_mult = s.width_mult
    head = OmegaConf.load(CONF / "head" / "ssdlite.yaml")
    val = {"_target_": "tasks.detection.coco.CocoDetection", "image_dir": "absent", "ann_file": "absent.json"}
    return OmegaConf.create({"backbone": backbone, "head": head, "dataset": {
        "task": "detection", "input_size": s.input_size, "num_classes": s.num_classes, "val": val}})


def realistic_logits(shape: torch.Size, s: PostprocessSettings, generator: torch.Generator) -> torch.Tensor:
    """[1, A, K + 1] logits where the background wins almost everywhere and a few objects score high."""
    logits = torch.randn(shape, generator=generator)
    logits[..., 0] += s.background_logit
    anchors = shape[1]
    for _ in range(s.objects):
        label = int(torch.randint(1, shape[2], (1,), generator=generator))
        where = torch.randperm(anchors, generator=generator)[:s.anchors_per_object]
        logits[0, where, label] += s.object_logit
    return logits


def candidates(cls_logits: torch.Tensor, head) -> dict:
    """(anchor, class) pairs above the threshold under the per-class top-k, and how many enter NMS."""
    scores = cls_logits.float().softmax(-1)[0, :, 1:]
    passing = int((scores > head.score_threshold).sum(0).clamp(max=head.topk_candidates).sum())
    return {"above_threshold": passing, "into_nms_at_most": min(passing, getattr(head, "nms_pre", None) or passing)}


def torchvision_post(head, image_size: int) -> Callable[[dict], list]:
    """torchvision's SSD.postprocess_detections with our head's settings (labels 1..K, no cap)."""
    ssd = SimpleNamespace(box_coder=det_utils.BoxCoder(head.box_coder.weights), score_thresh=head.score_threshold,
                          topk_candidates=head.topk_candidates, nms_thresh=head.nms_iou_threshold,
                          detections_per_img=head.detections_per_image)
    scale = torch.tensor([image_size] * 4, dtype=torch.float32)

    def post(outputs: dict) -> list:
        boxes = cxcywh_to_xyxy(torch.as_tensor(outputs["anchors"]))
        anchors = [boxes * scale.to(boxes.device)]  # the outputs' device: benchmarks/gpu.py runs this on CUDA
        return SSD.postprocess_detections(ssd, {k: torch.as_tensor(outputs[k]) for k in ("cls_logits",
                                                                                         "bbox_regression")},
                                          anchors, [(image_size, image_size)])

    return post


def paired_rounds(paths: dict[str, tuple[Callable[[], dict], Callable[[dict], object]]], repeats: int,
                  warmup: int) -> dict[str, dict[str, list[float]]]:
    """Per path and round: milliseconds of the network call and of the post-processing right after it."""
    names = list(paths)
    samples = {name: {"network": [], "post": []} for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                network, post = paths[name]
                t0 = time.perf_counter()
                outputs = network()
                t1 = time.perf_counter()
                result = post(outputs)
                t2 = time.perf_counter()
                del outputs, result
                if r >= warmup:
                    samples[name]["network"].append((t1 - t0) * 1e3)
                    samples[name]["post"].append((t2 - t1) * 1e3)
            if r % 8 == 7:
                gc.collect()
    finally:
        gc.enable()
    return samples


def run(settings: PostprocessSettings, log=print) -> dict:
    s = settings
    cfg = model_config(s)
    torch.manual_seed(s.seed)
    model = build_model(cfg.backbone, cfg.head, s.num_classes).eval()
    head = model.head
    generator = torch.Generator().manual_seed(s.seed)
    images = torch.randn(1, 3, s.input_size, s.input_size, generator=generator)
    sizes = [(s.input_size, s.input_size)]
    with torch.no_grad():
        raw = model(images)
    fake = realistic_logits(raw["cls_logits"].shape, s, generator)
    fake_scores = foreground_scores(fake)
    fake_outputs = {"cls_logits": fake, "class_scores": fake_scores.numpy(),
                    "best_class_score": fake_scores.amax(dim=-1).numpy()}
    shape = ("background_logit", "objects", "anchors_per_object", "object_logit")
    checks = {"nms_pre": getattr(head, "nms_pre", None),  # getattr: the section also times older heads
              "realistic_logits": {k: v for k, v in asdict(s).items() if k in shape},
              "candidates": {REGIMES[0]: candidates(raw["cls_logits"], head), REGIMES[1]: candidates(fake, head)}}
    peer_post = torchvision_post(head, s.input_size)
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="mobilevision-bench-post-") as tmp:
        sessions = {}
        if s.onnx:
            start = time.perf_counter()
            path = export_model(model, cfg, Path(tmp) / "ssdlite.onnx", dynamo=s.dynamo)
            checks["export_s"] = round(time.perf_counter() - start, 1)
            raw_path = export_model(model, cfg, Path(tmp) / "ssdlite_raw.onnx", dynamo=s.dynamo, decode_in_graph=False)
            sessions = {ORT: OnnxModel(path, threads=threads),
                        ORT_SPIN: OnnxModel(path, threads=threads, spinning=True),
                        ORT_RAW: OnnxModel(raw_path, threads=threads)}
        results = {}
        for regime in REGIMES:
            def swap(outputs: dict, regime=regime) -> dict:
                if regime == REGIMES[0]:
                    return outputs
                return outputs | {k: v for k, v in fake_outputs.items() if k in outputs}

            @torch.no_grad()
            def eager() -> dict:
                return model(images)

            paths = {EAGER: (eager, lambda o, swap=swap: head.predict(swap(o), sizes)),
                     PEER: (eager, lambda o, swap=swap: peer_post(swap(o)))}
            for name, session in sessions.items():
                paths[name] = (lambda session=session: session.run(images),
                               lambda o, session=session, swap=swap: decode_detections(
                                   swap(o), sizes, session.metadata["postprocess"]))
            with torch.no_grad():
                eager_dets = head.predict(swap(raw), sizes)[0]
                peer_dets = peer_post(swap(raw))[0]
            # untrained scores nearly tie, so the order of equal-looking detections may differ: compare sorted
            same_count = len(eager_dets["scores"]) == len(peer_dets["scores"])
            checks.setdefault("vs_torchvision_detections", {})[regime] = {
                "ours": len(eager_dets["scores"]), "torchvision": len(peer_dets["scores"]),
                "max_abs_diff_sorted_scores": float((eager_dets["scores"].sort().values
                                                     - peer_dets["scores"].sort().values).abs().max())
                if same_count and len(peer_dets["scores"]) > 0 else None}
            results[regime] = paired_rounds(paths, s.repeats, s.warmup)
            del paths
        del sessions

    rows = []
    for regime, per_path in results.items():
        for name, times in per_path.items():
            rows.append({"regime": regime, "path": name, "candidates": checks["candidates"][regime],
                         "network_ms": summarise(times["network"]).as_dict(),
                         "post_ms": summarise(times["post"]).as_dict(), "samples_ms": times,
                         "post_over_network": paired_ratio(times["post"], times["network"]).as_dict(),
                         # the least disturbed samples: on a busy machine a call of a few ms is either
                         # untouched or loses a whole time slice, so its median says more about the load
                         "min_post_over_min_network": min(times["post"]) / min(times["network"])})
        for row in rows[-len(per_path):]:
            if row["path"] == PEER:
                continue
            row["post_vs_torchvision"] = paired_ratio(per_path[row["path"]]["post"], per_path[PEER]["post"]).as_dict()
    log("postprocess: candidates per image " + ", ".join(f"{k}: {v['above_threshold']}"
                                                         for k, v in checks["candidates"].items()))
    return {"settings": asdict(s), "checks": checks, "section": {"rows": rows, "nms_pre": checks["nms_pre"],
                                                                  "input_size": s.input_size,
                                                                  "num_classes": s.num_classes}}


def format_table(section: dict) -> str:
    header = (f"{'scores':<17} {'candidates':>10} {'path':<59} {'network ms':>10} {'post ms':>8}  "
              f"{'post / network [q1, q3]':<23} {'min/min':>7}  post vs torchvision's")
    lines = ["", f"postprocess: SSDLite-MobileNetV2 @ {section['input_size']}, {section['num_classes']} classes, "
                 f"batch 1, nms_pre={section['nms_pre']}; network, then post-processing right after it "
                 f"(medians; ratios paired per round)", header, "-" * len(header)]
    regime = None
    for row in section["rows"]:
        if regime is not None and row["regime"] != regime:
            lines.append("")
        regime = row["regime"]
        r = row["post_over_network"]
        vs = row.get("post_vs_torchvision")
        vs = f"{vs['median']:.2f} [{vs['q1']:.2f}, {vs['q3']:.2f}]" if vs else "(peer)"
        lines.append(f"{row['regime']:<17} {row['candidates']['above_threshold']:>10} {row['path']:<59} "
                     f"{row['network_ms']['median']:>10.1f} {row['post_ms']['median']:>8.2f}  "
                     f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]{'':<5} "
                     f"{row['min_post_over_min_network']:>7.3f}  {vs}")
    lines.append("candidates = (anchor, class) pairs above the score threshold under the per-class top-k; "
                 "target: post / network <= 0.10; min/min = fastest post / fastest network (least disturbed)")
    return "\n".join(lines)
