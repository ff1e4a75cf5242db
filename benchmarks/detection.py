"""SSDLite-MobileNetV2: ours against the same architecture assembled from torchvision's public classes.

The peer is torchvision's `SSD` with its `SSDLiteHead`, on torchvision's `mobilenet_v2().features`
tapped like ours (C4 = the 576-channel expansion of features[14], C5 = the 1280 conv), plus four
`ssdlite._extra_block`s, `DefaultBoxGenerator([[2, 3]] * 6, 0.2, 0.95)`, the same thresholds. Our head
runs with `reduced_first_map=False`, which is that box set (6 boxes per location on every map).

Before timing, the peer receives our weights (both have the same tensors in the same order), so both
compute the same detections and the postprocessing does the same amount of work on each side; the
checks (parameter counts, MAdds, raw outputs, detections, first-step losses) go into the results.

The checks and the inference rows run in this process. The training contenders run in two spawned child
processes (benchmarks/processes.py), one with the C library's malloc and one with `cpu_memory=reuse`, as
tasks.train sets it on a CPU; the parent times each step by name in interleaved rounds across both.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead as TVSSDLiteHead
from torchvision.models.detection.ssdlite import _extra_block, _normal_init

from backbones import MobileNetV2
from heads.ssdlite import SSDLiteHead
from heads.ssdlite.box_coder import cxcywh_to_xyxy
from tasks.analysis.complexity import count_complexity
from tasks.training.model import BackboneWithHead

from .processes import StepProcess, StepReply, step_processes
from .timing import interleaved, paired_ratio, result_row, summarise

OURS = "ours: SSDLite-MobileNetV2"
PEER = "torchvision: SSD + SSDLiteHead on mobilenet_v2"
TRANSFORM = "torchvision: SSD.transform alone"
# Training contenders run in child processes (benchmarks/processes.py), one per `cpu_memory` setting
# (tasks/cpu_memory.py): glibc's malloc cannot be switched back within a process, so it is a process's setting.
SYSTEM, REUSE = "system", "reuse"  # the children's labels, and their cpu_memory setting
NCHW, CHANNELS_LAST = "NCHW", "channels_last"
NCHW_SYSTEM = f" ({NCHW}, cpu_memory={SYSTEM})"
CL_SYSTEM = f" ({CHANNELS_LAST}, cpu_memory={SYSTEM})"
CL_REUSE = f" ({CHANNELS_LAST}, cpu_memory={REUSE})"
# Training defaults: ours is tasks.train's on a CPU, channels_last with cpu_memory=reuse (conf/train.yaml);
# torchvision's detection reference scripts (references/detection/train.py, SSDLite recipe) train in the default
# NCHW layout, fp32, SGD, with the C library's allocator.
OURS_DEFAULT = f"{OURS}{CL_REUSE}, our default"
PEER_DEFAULT = f"{PEER}{NCHW_SYSTEM}, its reference default"
# Each timed training contender: (child process, side, layout). A child builds only the contenders it holds.
TRAIN_CONTENDERS = {
    OURS + NCHW_SYSTEM: (SYSTEM, "ours", NCHW),
    PEER + NCHW_SYSTEM: (SYSTEM, "peer", NCHW),
    OURS + CL_SYSTEM: (SYSTEM, "ours", CHANNELS_LAST),
    PEER + CL_SYSTEM: (SYSTEM, "peer", CHANNELS_LAST),
    OURS + CL_REUSE: (REUSE, "ours", CHANNELS_LAST),
    PEER + CL_REUSE: (REUSE, "peer", CHANNELS_LAST),
}
# The rows that share a contender's samples under another name.
TRAIN_ALIASES = {OURS_DEFAULT: OURS + CL_REUSE, PEER_DEFAULT: PEER + NCHW_SYSTEM}


@dataclass(frozen=True)
class DetectionSettings:
    input_size: int = 320
    num_classes: int = 80  # object classes; both models add a background class
    train_batch: int = 16
    infer_batch: int = 1
    train_repeats: int = 4
    # The cpu_memory=reuse child's heap still grows over its first steps (its two contenders alternate, and glibc
    # cannot serve an aligned request from a freed chunk of exactly that size until neighbours coalesce): at 320,
    # batch 4, its page faults per step went 176k, 13k, 19k, 0, 4k. Three untimed rounds keep that out of the
    # timing; each row records its faults per step (warm-up rounds apart) to show it.
    train_warmup: int = 3
    infer_repeats: int = 20
    warmup: int = 2  # inference
    max_boxes_per_image: int = 5
    lr: float = 1e-3
    seed: int = 0


class TorchvisionMobileNetV2Features(nn.Module):
    """torchvision's mobilenet_v2 features split at the C4 expansion, then the four SSDLite extras.

    Mirrors `ssdlite.SSDLiteFeatureExtractorMobileNet`, which expects MobileNetV3's block layout
    (`.block`); torchvision's MobileNetV2 blocks keep their layers in `.conv`.
    """

    def __init__(self, features: nn.Sequential, norm, extra_depths=(512, 256, 256, 128)):
        super().__init__()
        c4_pos = max(i for i, block in enumerate(features) if getattr(block, "stride", 1) == 2)
        if features[c4_pos].use_res_connect:
            raise ValueError(f"mobilenet_v2 features[{c4_pos}] has a residual; it cannot be split at its expansion.")
        self.features = nn.Sequential(
            nn.Sequential(*features[:c4_pos], features[c4_pos].conv[0]),  # until the C4 expansion (576 ch)
            nn.Sequential(features[c4_pos].conv[1:], *features[c4_pos + 1:]),  # until the 1280 conv
        )
        depths = [features[-1].out_channels, *extra_depths]
        self.extra = nn.ModuleList(_extra_block(a, b, norm) for a, b in zip(depths[:-1], depths[1:]))
        _normal_init(self.extra)
        self.out_channels = [features[c4_pos].conv[0].out_channels, *depths]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        output = []
        for block in (*self.features, *self.extra):
            x = block(x)
            output.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(output))


def build_ours(num_classes: int) -> BackboneWithHead:
    backbone = MobileNetV2(out_features=("C4", "C5"))
    return BackboneWithHead(backbone, SSDLiteHead(backbone.feature_info, num_classes, reduced_first_map=False))


def build_peer(num_classes: int, input_size: int, ours_head: SSDLiteHead) -> SSD:
    """The peer, with our head's thresholds. Its transform gets mean 0 / std 1 and a fixed size equal to
    the input, so it only re-batches the images and does an identity resize and normalisation."""
    norm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.03)  # torchvision's SSDLite norm (and ours)
    backbone = TorchvisionMobileNetV2Features(torchvision.models.mobilenet_v2().features, norm)
    anchors = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
    head = TVSSDLiteHead(backbone.out_channels, anchors.num_anchors_per_location(), num_classes + 1, norm)
    return SSD(backbone, anchors, (input_size, input_size), num_classes + 1,
               image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], head=head,
               score_thresh=ours_head.score_threshold, nms_thresh=ours_head.nms_iou_threshold,
               detections_per_img=ours_head.detections_per_image, topk_candidates=ours_head.topk_candidates,
               iou_thresh=ours_head.iou_threshold, positive_fraction=1.0 / (1.0 + ours_head.neg_pos_ratio))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy every parameter and buffer in state-dict order; the two layouts list the same tensors."""
    src, dst = source.state_dict(), target.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"cannot copy weights: {len(src)} tensors in ours, {len(dst)} in the peer.")
    mapped = {}
    for (name_s, tensor_s), (name_d, tensor_d) in zip(src.items(), dst.items()):
        if tensor_s.shape != tensor_d.shape:
            raise RuntimeError(f"cannot copy weights: {name_s} {tuple(tensor_s.shape)} lines up with "
                               f"{name_d} {tuple(tensor_d.shape)}.")
        mapped[name_d] = tensor_s.clone()
    target.load_state_dict(mapped)


def random_targets(batch: int, size: int, num_classes: int, max_boxes: int, generator: torch.Generator
                   ) -> tuple[list[dict], list[dict]]:
    """The same random boxes for both: ours normalised xyxy + labels 0..K-1, the peer's pixel xyxy + 1..K."""
    ours, peer = [], []
    for _ in range(batch):
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=generator))
        centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        half = torch.rand(n, 2, generator=generator) * 0.2 + 0.05
        boxes = torch.cat([centre - half, centre + half], dim=1).clamp(0.0, 1.0)
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        ours.append({"boxes": boxes, "labels": labels})
        peer.append({"boxes": boxes * size, "labels": labels + 1})
    return ours, peer


@torch.no_grad()
def parity_checks(ours: BackboneWithHead, peer: SSD, images: Tensor) -> dict:
    """Same raw outputs, anchors and detections from both (eval mode, same weights)."""
    ours.eval(), peer.eval()
    size = images.shape[-1]
    out = ours(images)
    features = list(peer.backbone(images).values())
    theirs = peer.head(features)
    anchors = peer.anchor_generator(peer.transform(list(images))[0], features)[0]
    dets_ours = ours.predict(out, [tuple(images.shape[-2:])] * images.shape[0])
    dets_peer = peer(list(images))
    scores_ours = torch.sort(torch.cat([d["scores"] for d in dets_ours]), descending=True).values
    scores_peer = torch.sort(torch.cat([d["scores"] for d in dets_peer]), descending=True).values
    same_count = scores_ours.numel() == scores_peer.numel() > 0
    # How many (anchor, class) candidates reach NMS: the postprocessing's work, the same on both sides.
    scores = out["cls_logits"].softmax(-1)[..., 1:]
    above = (scores > ours.head.score_threshold).sum(dim=1).clamp(max=ours.head.topk_candidates)
    return {
        "nms_candidates_per_image": above.sum(dim=1).tolist(),
        "max_abs_diff_cls_logits": float((out["cls_logits"] - theirs["cls_logits"]).abs().max()),
        "max_abs_diff_bbox_regression": float((out["bbox_regression"] - theirs["bbox_regression"]).abs().max()),
        "max_abs_diff_anchors_px": float((cxcywh_to_xyxy(out["anchors"]) * size - anchors).abs().max()),
        "detections_per_image_ours": [len(d["scores"]) for d in dets_ours],
        "detections_per_image_peer": [len(d["scores"]) for d in dets_peer],
        "max_abs_diff_sorted_scores": float((scores_ours - scores_peer).abs().max()) if same_count else None,
    }


def loss_checks(ours: BackboneWithHead, peer: SSD, images: Tensor, ours_targets, peer_targets) -> dict:
    """Both losses on the same batch and weights (train mode, no backward): they should agree."""
    ours.train(), peer.train()
    with torch.no_grad():
        a = ours.loss(ours(images), ours_targets)
        b = peer(list(images), peer_targets)
    return {"ours_loss_box": float(a["loss_box"]), "peer_loss_box": float(b["bbox_regression"]),
            "ours_loss_cls": float(a["loss_cls"]), "peer_loss_cls": float(b["classification"])}


def _fail_if_different(checks: dict, tolerance: float = 1e-3) -> None:
    worst = max(checks["max_abs_diff_cls_logits"], checks["max_abs_diff_bbox_regression"],
                checks["max_abs_diff_anchors_px"])
    if worst > tolerance:
        raise RuntimeError(f"ours and the torchvision peer give different outputs (max abs diff {worst:.3g}); "
                           f"the two architectures are not the same, so their timings would not compare.")


@dataclass(frozen=True)
class DetectionInputs:
    infer_images: Tensor
    train_images: Tensor
    ours_targets: list[dict]
    peer_targets: list[dict]


def build_models(s: DetectionSettings) -> tuple[BackboneWithHead, SSD]:
    """Ours from `s.seed`, and the peer holding our weights: the same models in every process."""
    torch.manual_seed(s.seed)
    ours = build_ours(s.num_classes)
    peer = build_peer(s.num_classes, s.input_size, ours.head)
    copy_weights(ours, peer)
    return ours, peer


def draw_inputs(s: DetectionSettings) -> DetectionInputs:
    """Inference images, training images and targets from `s.seed`: the same tensors in every process."""
    generator = torch.Generator().manual_seed(s.seed)
    size = s.input_size
    infer_images = torch.randn(s.infer_batch, 3, size, size, generator=generator)
    train_images = torch.randn(s.train_batch, 3, size, size, generator=generator)
    ours_targets, peer_targets = random_targets(s.train_batch, size, s.num_classes, s.max_boxes_per_image,
                                                generator)
    return DetectionInputs(infer_images, train_images, ours_targets, peer_targets)


def training_steps(s: DetectionSettings, contenders: tuple[tuple[str, str], ...]) -> dict[str, Callable[[], None]]:
    """{"<side> <layout>": one training step} for each (side, layout) asked for, side ours | peer, layout NCHW |
    channels_last: zero_grad, forward, loss, backward, SGD step at batch train_batch, on a copy of the model
    (own weights, own optimizer) in that layout. The builder of benchmarks/processes.py's children."""
    ours, peer = build_models(s)
    inputs = draw_inputs(s)
    formats = {NCHW: torch.contiguous_format, CHANNELS_LAST: torch.channels_last}

    def ours_step(model, images):
        optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=4e-5)

        def step():
            optimizer.zero_grad(set_to_none=True)
            losses = model.loss(model(images), inputs.ours_targets)
            sum(losses.values()).backward()
            optimizer.step()
        return step

    def peer_step(model, images):
        optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=4e-5)

        def step():
            optimizer.zero_grad(set_to_none=True)
            losses = model(images, inputs.peer_targets)
            sum(losses.values()).backward()
            optimizer.step()
        return step

    steps = {}
    for side, layout in contenders:
        memory_format = formats[layout]
        model = copy.deepcopy({"ours": ours, "peer": peer}[side]).to(memory_format=memory_format).train()
        images = inputs.train_images.contiguous(memory_format=memory_format)
        steps[f"{side} {layout}"] = ours_step(model, images) if side == "ours" else peer_step(model, list(images))
    return steps


def time_training(s: DetectionSettings, log=print) -> tuple[dict[str, list[float]], dict[str, dict], dict]:
    """TRAIN_CONTENDERS in interleaved rounds, each in its child process; the parent's clock times each call.

    Returns the milliseconds per contender, per contender where it ran and its page faults per step, and
    the children's info.
    """
    held = {label: tuple((side, layout) for child, side, layout in TRAIN_CONTENDERS.values() if child == label)
            for label in (SYSTEM, REUSE)}
    children = {label: StepProcess(label, training_steps, s, contenders, cpu_memory=label)
                for label, contenders in held.items()}
    replies: dict[str, list[StepReply]] = {name: [] for name in TRAIN_CONTENDERS}
    with step_processes(*children.values()):
        for child in children.values():
            info = child.info
            log(f"detection: training process {info.label!r} (pid {info.pid}, {info.threads} threads): "
                f"{info.allocator}")
        # The pipe's round trip (pickling a name and a small reply) takes microseconds, against steps of a
        # second or more; only one process computes at a time, as the parent waits on each reply.
        samples = interleaved({name: children[child].caller(f"{side} {layout}", replies[name])
                               for name, (child, side, layout) in TRAIN_CONTENDERS.items()},
                              s.train_repeats, s.train_warmup)
    where = {}
    for name, (child, _, layout) in TRAIN_CONTENDERS.items():
        info = children[child].info
        faults = [r.minor_faults for r in replies[name]]  # one call per round, the warm-up rounds first
        where[name] = {"process": child, "pid": info.pid, "cpu_memory": info.cpu_memory,
                       "memory_reuse_applied": info.memory_reuse_applied, "layout": layout,
                       "minor_faults_per_step": summarise(faults[s.train_warmup:]).as_dict(),
                       "minor_faults_samples": faults[s.train_warmup:], "minor_faults_warmup": faults[:s.train_warmup]}
    return samples, where, {label: asdict(child.info) for label, child in children.items()}


def run(settings: DetectionSettings, log=print) -> dict:
    s = settings
    ours, peer = build_models(s)
    params_ours, params_peer = count_params(ours), count_params(peer)
    log(f"detection: params ours {params_ours:,} / torchvision {params_peer:,}")
    if params_ours != params_peer:
        raise RuntimeError(f"parameter counts differ (ours {params_ours:,}, torchvision {params_peer:,}); "
                           f"the peer is not the same architecture.")
    inputs = draw_inputs(s)
    size = s.input_size
    infer_images = inputs.infer_images
    checks = {"params_ours": params_ours, "params_peer": params_peer}
    complexity = {OURS: count_complexity(ours, infer_images[:1]), PEER: count_complexity(peer, infer_images[:1])}
    checks["madds_ours"], checks["madds_peer"] = complexity[OURS].madds, complexity[PEER].madds
    checks.update(parity_checks(ours, peer, infer_images))
    _fail_if_different(checks)
    log(f"detection: MAdds ours {checks['madds_ours'] / 1e9:.3f} B / torchvision {checks['madds_peer'] / 1e9:.3f} B;"
        f" max |diff| cls {checks['max_abs_diff_cls_logits']:.2g}, box {checks['max_abs_diff_bbox_regression']:.2g};"
        f" detections {checks['detections_per_image_ours']} / {checks['detections_per_image_peer']}")

    # Inference at batch infer_batch, postprocessing included, in this process; the peer's list of images is
    # made once.
    infer_list = list(infer_images)
    image_sizes = [(size, size)] * s.infer_batch

    @torch.no_grad()
    def ours_infer():
        return ours.predict(ours(infer_images), image_sizes)

    @torch.no_grad()
    def peer_infer():
        return peer(infer_list)

    @torch.no_grad()
    def peer_transform():  # timed on its own too, to show what the peer's share of it costs
        return peer.transform(infer_list)

    ours.eval(), peer.eval()
    infer = interleaved({OURS: ours_infer, PEER: peer_infer, TRANSFORM: peer_transform}, s.infer_repeats,
                        s.warmup)

    checks.update(loss_checks(ours, peer, inputs.train_images, inputs.ours_targets, inputs.peer_targets))
    log(f"detection: first-step losses ours box {checks['ours_loss_box']:.4f} cls {checks['ours_loss_cls']:.4f} / "
        f"torchvision box {checks['peer_loss_box']:.4f} cls {checks['peer_loss_cls']:.4f}")
    # Training step at batch train_batch: six contenders in two child processes, the same rounds.
    train, where, checks["train_processes"] = time_training(s, log)
    for alias, name in TRAIN_ALIASES.items():
        train[alias], where[alias] = train[name], where[name]
    for name, (_, side, _) in TRAIN_CONTENDERS.items():
        complexity[name] = complexity[{"ours": OURS, "peer": PEER}[side]]
    for alias, name in TRAIN_ALIASES.items():
        complexity[alias] = complexity[name]
    for name in (OURS, PEER):  # inference: this process, the allocator it started with
        where[name] = {"process": "main", "cpu_memory": SYSTEM}

    rows, comparisons = [], []
    train_measure = f"train step, batch {s.train_batch}"
    for measure, samples, a, b in (
            (f"{train_measure}, NCHW, cpu_memory=system (like for like)", train, OURS + NCHW_SYSTEM,
             PEER + NCHW_SYSTEM),
            (f"{train_measure}, channels_last, cpu_memory=system (like for like)", train, OURS + CL_SYSTEM,
             PEER + CL_SYSTEM),
            (f"{train_measure}, channels_last, cpu_memory=reuse (like for like)", train, OURS + CL_REUSE,
             PEER + CL_REUSE),
            (f"{train_measure}, each side's default", train, OURS_DEFAULT, PEER_DEFAULT),
            (f"{train_measure}, ours channels_last: cpu_memory=reuse against system (not torchvision)", train,
             OURS + CL_REUSE, OURS + CL_SYSTEM),
            (f"inference + postprocess, batch {s.infer_batch}", infer, OURS, PEER)):
        for name, role in ((a, "ours"), (b, "peer")):
            rows.append({**result_row("detection", name, role, measure, complexity[name], samples[name]),
                         **where[name]})
        ratio = paired_ratio(samples[a], samples[b])
        comparisons.append({"task": "detection", "measure": measure, "ours": a, "peer": b,
                            "ratio": ratio.as_dict()})
        rows[-2]["ratio"] = ratio.as_dict()
    checks["peer_transform_ms"] = summarise(infer[TRANSFORM]).as_dict()
    checks["peer_transform_samples_ms"] = infer[TRANSFORM]
    return {"settings": asdict(s), "checks": checks, "rows": rows, "comparisons": comparisons}
