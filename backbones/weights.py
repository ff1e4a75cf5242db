"""Published MobileNet checkpoints (torchvision, timm) converted into mobilevision's key space.

Everything is converted into the key space of `ImageClassifier(backbone)` ("backbone.*" and "fc.*");
a bare backbone then takes the "backbone.*" part. Keys are renamed by explicit tables, never by
parameter order, and every tensor (BN running stats and num_batches_tracked included) is carried.

Preprocessing differs between the sources (ours is the ImageNet mean/std of the datasets):
torchvision's weights expect ImageNet mean/std (V2: resize 232, crop 224); timm's
`ra4_e3600_r224_in1k` MobileNetV1 weights expect mean = std = 0.5, bicubic, crop 0.875 (0.9 for 1.25).
"""
from __future__ import annotations

import re
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .base import Backbone
from .classifier import ImageClassifier

TORCHVISION_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")
TIMM_MODELS = ("mobilenetv1_100", "mobilenetv1_125")
SOURCES = (*(f"torchvision:{w}" for w in TORCHVISION_WEIGHTS), *(f"timm:{m}" for m in TIMM_MODELS))
# "imagenet": each backbone's published ImageNet weights, so swapping backbones in a config that
# asks for pretrained weights needs no other change. Keyed by (backbone class, width).
IMAGENET_DEFAULTS = {
    ("MobileNetV2", 1.0): "torchvision:IMAGENET1K_V1",
    ("MobileNetV1", 1.0): "timm:mobilenetv1_100",
    ("MobileNetV1", 1.25): "timm:mobilenetv1_125",
}
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What each family's published weights were trained with: (mean, std, activation). The backbone
# configs read it (conf/backbone/*.yaml) so the dataset transforms and every export follow the weights.
PREPROCESSING = {
    "torchvision": (IMAGENET_MEAN, IMAGENET_STD, "relu6"),
    "timm": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "relu6"),
}
PUBLISHED_FAMILY = {"MobileNetV2": "torchvision", "MobileNetV1": "timm"}


def weights_preprocessing(source: str | None, backbone_class: str, default_act: str = "relu"
                          ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, activation) that the weights `source` expect; ImageNet statistics and `default_act`
    when training from scratch or from a local file (whose training is not known from its name)."""
    scheme = str(source).partition(":")[0] if source else ""
    family = PUBLISHED_FAMILY.get(backbone_class) if scheme == "imagenet" else scheme
    if family in PREPROCESSING:
        return PREPROCESSING[family]
    return IMAGENET_MEAN, IMAGENET_STD, default_act

# The layout each family was trained with, and the backbone class it converts into.
FAMILIES = {
    "torchvision": ("torchvision's MobileNetV2", "MobileNetV2", nn.ReLU6),
    "timm": ("timm's MobileNetV1", "MobileNetV1", nn.ReLU6),
    "mobilevision": ("mobilevision", None, None),
}

# torchvision MobileNetV2 block "features.<i>.conv.<module>" -> ours "blocks.<i-1>.<module>".
TV_BLOCK_WITH_EXPANSION = {
    "0.0": "expand.conv", "0.1": "expand.bn",
    "1.0": "dw.conv", "1.1": "dw.bn",
    "2": "project.conv", "3": "project.bn",
}
TV_BLOCK_WITHOUT_EXPANSION = {  # the t=1 first block
    "0.0": "dw.conv", "0.1": "dw.bn",
    "1": "project.conv", "2": "project.bn",
}
TV_CONV_BN = {"0": "conv", "1": "bn"}  # features.0 (stem) and the last features.<n> (1x1 1280 conv)

# timm MobileNetV1 (EfficientNet class, DepthwiseSeparableConv blocks "blocks.<stage>.<block>.*").
TIMM_STEM = {"conv_stem": "stem.conv", "bn1": "stem.bn"}
TIMM_BLOCK = {"conv_dw": "dw.conv", "bn1": "dw.bn", "conv_pw": "pw.conv", "bn2": "pw.bn"}
TIMM_CLASSIFIER = {"classifier": "fc"}


def convert_torchvision_mobilenet_v2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision.models.mobilenet_v2 state dict -> ImageClassifier(MobileNetV2) keys."""
    feature_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"features\.(\d+)\.", k))}
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"features\.(\d+)\.conv\.", k))}
    expanding = {i for i in block_ids if f"features.{i}.conv.3.weight" in state_dict}
    last_conv_ids = feature_ids - block_ids - {0}
    if len(last_conv_ids) > 1:
        raise ValueError(f"torchvision MobileNetV2 state dict has several non-block feature layers "
                         f"{sorted(last_conv_ids)}; expected only the stem (0) and the last 1x1 conv.")
    out = {}
    for key, tensor in state_dict.items():
        new = None
        if m := re.fullmatch(r"features\.(\d+)\.conv\.(\d+(?:\.\d+)?)\.(\w+)", key):
            index, module, param = int(m.group(1)), m.group(2), m.group(3)
            table = TV_BLOCK_WITH_EXPANSION if index in expanding else TV_BLOCK_WITHOUT_EXPANSION
            if module in table:
                new = f"backbone.blocks.{index - 1}.{table[module]}.{param}"
        elif m := re.fullmatch(r"features\.(\d+)\.(\d)\.(\w+)", key):
            index, module, param = int(m.group(1)), m.group(2), m.group(3)
            prefix = "stem" if index == 0 else "last_conv"
            if module in TV_CONV_BN:
                new = f"backbone.{prefix}.{TV_CONV_BN[module]}.{param}"
        elif m := re.fullmatch(r"classifier\.1\.(weight|bias)", key):
            new = f"fc.{m.group(1)}"
        if new is None:
            raise ValueError(f"state dict key {key} is not part of torchvision's MobileNetV2 layout "
                             f"(features.<i>.conv.*, features.0/<last>.<0|1>.*, classifier.1.*).")
        out[new] = tensor
    return out


def convert_timm_mobilenet_v1(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm mobilenetv1_* state dict -> ImageClassifier(MobileNetV1) keys.

    timm nests blocks by stage ("blocks.<stage>.<block>"); ours are flat, numbered in
    (stage, block) order.
    """
    if "conv_head.weight" in state_dict:
        raise ValueError("timm MobileNetV1 state dict has a conv_head (the mobilenetv1_*h variants), "
                         "which mobilevision's MobileNetV1 does not have; use mobilenetv1_100 or "
                         "mobilenetv1_125.")
    pairs = sorted({(int(m.group(1)), int(m.group(2)))
                    for k in state_dict if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))})
    flat = {pair: i for i, pair in enumerate(pairs)}
    out = {}
    for key, tensor in state_dict.items():
        new = None
        if m := re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)", key):
            stage, block, module, param = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            if module in TIMM_BLOCK:
                new = f"backbone.blocks.{flat[stage, block]}.{TIMM_BLOCK[module]}.{param}"
        elif m := re.fullmatch(r"(\w+)\.(\w+)", key):
            module, param = m.group(1), m.group(2)
            if module in TIMM_STEM:
                new = f"backbone.{TIMM_STEM[module]}.{param}"
            elif module in TIMM_CLASSIFIER:
                new = f"{TIMM_CLASSIFIER[module]}.{param}"
        if new is None:
            raise ValueError(f"state dict key {key} is not part of timm's MobileNetV1 layout "
                             f"(conv_stem, bn1, blocks.<stage>.<block>.conv_dw/bn1/conv_pw/bn2, classifier).")
        out[new] = tensor
    return out


def load_pretrained(model: nn.Module, source: str, strict: bool = True) -> nn.Module:
    """Load `source` into a backbone (body only) or an ImageClassifier (body and fc); returns `model`.

    `source` is one of SOURCES (downloaded through torchvision / timm, needs internet) or a local
    .pth/.pt/.safetensors file holding a torchvision, timm or mobilevision state dict (a mobilevision
    training checkpoint's "model" entry works too). A backbone takes the checkpoint's "backbone.*"
    part and drops the rest (fc, a detection or segmentation head); MobileNetV2(last_conv=False) also
    drops the 1280 conv. `strict=False` tolerates missing and unexpected keys and loads weights trained
    with another activation (with a warning); shapes must always match.
    """
    if isinstance(model, ImageClassifier):
        backbone, prefix = model.backbone, ""
    elif isinstance(model, Backbone):
        backbone, prefix = model, "backbone."
    else:
        raise TypeError(f"load_pretrained expects a mobilevision Backbone or ImageClassifier, "
                        f"got {type(model).__name__}.")
    activation_strict = strict
    if source == "imagenet":
        source = imagenet_source(backbone)
        activation_strict = False  # fine-tuning adapts; a warning still says so
    label = f"checkpoint {source}"
    raw = _read_source(source, label)
    family = _detect_family(raw, label)
    name, backbone_class, activation = FAMILIES[family]
    if backbone_class is not None and type(backbone).__name__ != backbone_class:
        raise ValueError(f"{label} holds {name} weights, which do not fit {_describe(model)}; "
                         f"build a {backbone_class} to load them.")
    converted = _convert(raw, family)

    if prefix:
        converted = {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}
    if getattr(backbone, "last_conv", True) is None:  # MobileNetV2(last_conv=False): "MNet V2*"
        drop = "last_conv." if prefix else "backbone.last_conv."
        converted = {k: v for k, v in converted.items() if not k.startswith(drop)}
    _check_fit(model, converted, label, strict)
    _check_activation(backbone, activation, name, label, activation_strict)
    model.load_state_dict(converted, strict=strict)
    return model


def imagenet_source(backbone: Backbone) -> str:
    """The published ImageNet weights for this backbone class and width."""
    key = (type(backbone).__name__, float(getattr(backbone, "width_mult", 0)))
    if key not in IMAGENET_DEFAULTS:
        available = ", ".join(f"{cls} width {w}" for cls, w in IMAGENET_DEFAULTS)
        raise ValueError(f"pretrained=imagenet has no published weights for {_describe(backbone)}; "
                         f"they exist for {available} (or pass a local file).")
    return IMAGENET_DEFAULTS[key]


def _read_source(source: str, label: str) -> dict[str, torch.Tensor]:
    scheme, _, name = source.partition(":")
    if scheme == "torchvision" and name:
        if name not in TORCHVISION_WEIGHTS:
            raise ValueError(_unknown(source))
        return _torchvision_state(source, name)
    if scheme == "timm" and name:
        if name not in TIMM_MODELS:
            raise ValueError(_unknown(source))
        return _timm_state(source, name)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, label)
    if path.suffix in FILE_SUFFIXES or "/" in source or "\\" in source:
        raise FileNotFoundError(f"{label} does not exist; expected a local weights file or one of "
                                f"{', '.join(SOURCES)}.")
    raise ValueError(_unknown(source))


NETWORK_TIMEOUT_S = 3.0  # one connection attempt; offline, nothing retries for longer than this
HF_HUB = "https://huggingface.co"


class WeightsUnavailableError(FileNotFoundError):
    """Published weights that are neither in the local cache nor downloadable (offline, blocked)."""


def _unreachable(url: str) -> str | None:
    """None when a TCP connection to the url's host opens within NETWORK_TIMEOUT_S; else why not."""
    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=NETWORK_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {' '.join(str(err).split()) or 'no answer'}"


def _unavailable(source: str, where: str, cache: Path | str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained={source}: the weights could not be downloaded from {where} ({why}) and are not in the "
        f"local cache {cache}; put the file there, or download it elsewhere and pass it as "
        f"backbone.pretrained=/path/to/weights.pth (or .safetensors).")


def torchvision_location(name: str) -> tuple[str, Path]:
    """(download url, local cache file) of torchvision's MobileNetV2 weights `name`."""
    import torchvision

    url = torchvision.models.MobileNet_V2_Weights[name].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _torchvision_state(source: str, name: str) -> dict[str, torch.Tensor]:
    import torchvision

    url, cache = torchvision_location(name)
    if not cache.is_file() and (why := _unreachable(url)):
        raise _unavailable(source, url, cache, why)
    try:
        weights = torchvision.models.MobileNet_V2_Weights[name]
        return dict(weights.get_state_dict(progress=True, check_hash=True, weights_only=True))
    except (OSError, RuntimeError) as err:  # URLError, a dropped connection, a hash mismatch
        raise _unavailable(source, url, cache, f"{type(err).__name__}: {' '.join(str(err).split())}") from None


def timm_location(name: str) -> tuple[str, Path]:
    """(Hugging Face hub id, local cache folder) of timm's weights `name`."""
    import timm
    from huggingface_hub.constants import HF_HUB_CACHE

    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    return hub_id, Path(HF_HUB_CACHE) / f"models--{hub_id.replace('/', '--')}"


def _timm_state(source: str, name: str) -> dict[str, torch.Tensor]:
    try:
        import timm
    except ImportError:
        raise ImportError(f"loading {source} needs timm, which is not installed; install "
                          f"mobilevision[timm] (pip install 'mobilevision[timm]').") from None
    hub_id, cache = timm_location(name)
    cached = sorted([*cache.glob("snapshots/*/model.safetensors"), *cache.glob("snapshots/*/pytorch_model.bin")])
    if cached:  # read straight from the cache: the hub would still ask the network for the latest revision
        return _read_file(cached[-1], f"checkpoint {cached[-1]}")
    if why := _unreachable(HF_HUB):
        raise _unavailable(source, f"the Hugging Face hub ({hub_id})", cache, why)
    try:
        return dict(timm.create_model(name, pretrained=True).state_dict())
    except (OSError, RuntimeError) as err:
        raise _unavailable(source, f"the Hugging Face hub ({hub_id})", cache,
                           f"{type(err).__name__}: {' '.join(str(err).split())[:200]}") from None


def _unknown(source: str) -> str:
    return (f"pretrained source {source!r} is unknown; expected imagenet, one of {', '.join(SOURCES)}, "
            f"or the path of a local .pth/.pt/.safetensors file.")


def _read_file(path: Path, label: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package; "
                              f"pip install safetensors.") from None
        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused, truncated zip, not a torch file, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{label} cannot be read with torch.load(weights_only=True) "
                             f"({type(err).__name__}: {first}); expected a state dict saved by torch.save."
                             ) from None
    if isinstance(state, Mapping) and not _is_state_dict(state):
        for entry in ("model", "state_dict"):  # a mobilevision training checkpoint, or Lightning's
            if isinstance(state.get(entry), Mapping):
                state = state[entry]
                break
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        found = type(state).__name__ + (f" with keys {list(state)[:5]}" if isinstance(state, Mapping) else "")
        raise ValueError(f"{label} does not hold a state dict (a dict of tensors): found {found}.")
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_state_dict(state: Mapping) -> bool:
    return len(state) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                  for k, v in state.items())


def _detect_family(state: Mapping[str, torch.Tensor], label: str) -> str:
    if "features.0.0.weight" in state and any(re.match(r"features\.\d+\.conv\.", k) for k in state):
        return "torchvision"
    if "conv_stem.weight" in state and any(re.match(r"blocks\.\d+\.\d+\.conv_dw\.", k) for k in state):
        if any(".conv_pwl." in k for k in state):
            raise ValueError(f"{label} holds timm's MobileNetV2 (conv_pwl keys), which is not supported; "
                             f"use torchvision:IMAGENET1K_V1/V2 for MobileNetV2.")
        return "timm"
    if any(k.startswith(("backbone.stem.", "stem.")) for k in state):
        return "mobilevision"
    raise ValueError(f"{label} is not a torchvision MobileNetV2, timm MobileNetV1 or mobilevision state "
                     f"dict: its first keys are {list(state)[:3]}.")


def _convert(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    if family == "torchvision":
        return convert_torchvision_mobilenet_v2(state)
    if family == "timm":
        return convert_timm_mobilenet_v1(state)
    if any(k.startswith("stem.") for k in state):  # a bare backbone's state dict
        return {f"backbone.{k}": v for k, v in state.items()}
    return state


def _check_activation(backbone: Backbone, expected: type[nn.Module] | None, name: str, label: str,
                      strict: bool) -> None:
    if expected is None:
        return
    found = sorted({type(m).__name__ for m in backbone.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))
                    and not isinstance(m, expected)})
    if not found:
        return
    message = (f"{label} holds {name} weights trained with {expected.__name__}, but "
               f"{_describe(backbone)} uses {', '.join(found)}, so its outputs would differ from the "
               f"published model's; build the backbone with {expected.__name__} activations, or pass "
               f"strict=False to load the weights anyway (e.g. to fine-tune).")
    if strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def _check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], label: str, strict: bool) -> None:
    """Fail with one sentence naming the first mismatching key (in the model's order)."""
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state:
            if strict:
                raise ValueError(f"{label} does not fit {_describe(model)}: the model's {key} is not in "
                                 f"the checkpoint.")
        elif state[key].shape != tensor.shape:
            raise ValueError(f"{label} does not fit {_describe(model)}: {key} is {list(state[key].shape)} "
                             f"in the checkpoint but {list(tensor.shape)} in the model.")
    extra = [k for k in state if k not in own]
    if strict and extra:
        raise ValueError(f"{label} does not fit {_describe(model)}: the checkpoint's {extra[0]} has no "
                         f"place in the model.")


def _describe(model: nn.Module) -> str:
    if isinstance(model, ImageClassifier):
        return f"ImageClassifier({_describe(model.backbone)}, num_classes={model.fc.out_features})"
    options = f"width_mult={getattr(model, 'width_mult', '?')}"
    if getattr(model, "last_conv", True) is None:
        options += ", last_conv=False"
    return f"{type(model).__name__}({options})"
