"""What a dataset check finds: problems (fatal or warnings), per-split summaries, and the report.

The format-specific checks (tasks.detection.check_coco / check_voc, tasks.segmentation.check_voc)
fill a `Collector`; `tasks.datasets.check.check_dataset` picks the check for a dataset config.
"""
from __future__ import annotations

import itertools
import os
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.errors import DataError

LAYOUT_NAMES = {"coco": "COCO json", "voc_det": "VOC xml", "voc_seg": "VOC segmentation PNGs"}


@dataclass(frozen=True)
class Problem:
    kind: str
    file: str  # the file to fix
    message: str  # one sentence: "<file>: <what>; expected <what>."


@dataclass
class SplitSummary:
    name: str  # "train", "val", or "train+val" when both read the same files
    layout: str
    source: str
    images: int = 0
    images_without_objects: int = 0
    unit: str = "boxes"  # or "pixels"
    per_class: dict[str, int] = field(default_factory=dict)
    ignored: int = 0  # crowd (COCO) or difficult (VOC) boxes, counted apart from per_class
    ignored_name: str = "crowd"


@dataclass
class DataReport:
    task: str
    layout: str
    splits: list[SplitSummary] = field(default_factory=list)
    fatal: list[Problem] = field(default_factory=list)  # the first `max_examples` of each kind
    warnings: list[Problem] = field(default_factory=list)
    fatal_counts: Counter = field(default_factory=Counter)  # kind -> how many in all
    warning_counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.fatal_counts

    @property
    def num_fatal(self) -> int:
        return sum(self.fatal_counts.values())

    @property
    def num_warnings(self) -> int:
        return sum(self.warning_counts.values())

    def sentence(self) -> str | None:
        """The one sentence that stops training, or None when nothing does."""
        if self.ok:
            return None
        n = self.num_fatal
        return (f"dataset check failed: {n} problem{'s' if n != 1 else ''} that stop{'' if n != 1 else 's'} "
                f"training, first: {self.fatal[0].message}")

    def raise_if_fatal(self) -> None:
        if not self.ok:
            raise DataError(self.sentence())

    def summary(self) -> str:
        lines = [f"dataset check ({self.task}, {LAYOUT_NAMES.get(self.layout, self.layout)}) "
                 f"took {self.seconds:.1f} s"]
        for s in self.splits:
            total = sum(s.per_class.values())
            extra = f", {s.ignored} {s.ignored_name}" if s.ignored else ""
            lines.append(f"{s.name}: {s.source}: {s.images} images ({s.images_without_objects} without objects), "
                         f"{total} {'masked ' if s.unit == 'pixels' else ''}{s.unit}{extra}")
            if s.per_class:
                text = ", ".join(f"{k} {v}" for k, v in s.per_class.items())
                lines += textwrap.wrap(text, 110, initial_indent="  ", subsequent_indent="  ")
        for title, counts, examples in (("problems that stop training", self.fatal_counts, self.fatal),
                                        ("warnings", self.warning_counts, self.warnings)):
            lines.append(f"{title}: {sum(counts.values())}")
            for kind, count in counts.items():
                lines.append(f"  {kind}: {count}")
                lines += [f"    {p.message}" for p in examples if p.kind == kind]
        lines.append("result: " + ("OK" if self.ok else f"FAILED ({self.num_fatal} problems that stop training)"))
        return "\n".join(lines)


class Collector:
    """Counts every problem, keeps the first `max_examples` messages of each kind."""

    def __init__(self, report: DataReport, max_examples: int):
        self.report, self.max_examples = report, max(int(max_examples), 1)

    def add(self, kind: str, file: Path | str, message: str, fatal: bool = True) -> None:
        self.add_many(kind, 1, [(file, message)], fatal)

    def add_many(self, kind: str, count: int, examples: Iterable[tuple[Path | str, str]], fatal: bool = True) -> None:
        """`examples` is lazy: only the first few messages are ever formatted."""
        if count <= 0:
            return
        counts, kept = ((self.report.fatal_counts, self.report.fatal) if fatal
                        else (self.report.warning_counts, self.report.warnings))
        room = self.max_examples - sum(1 for p in kept if p.kind == kind)
        counts[kind] += count
        for file, message in itertools.islice(examples, max(room, 0)):
            kept.append(Problem(kind, str(file), message))

    def first(self, kind: str, bad: np.ndarray, describe: Callable[[int], tuple[Path | str, str]],
              fatal: bool = True) -> None:
        """Record every True of `bad`, formatting messages for the first few only."""
        idx = np.flatnonzero(bad)
        self.add_many(kind, len(idx), (describe(int(i)) for i in idx), fatal)


def describe_error(err: BaseException) -> str:
    text = " ".join(str(err).split()).rstrip(".") or "no detail"
    return f"{type(err).__name__}: {text}"


def listdir(folder: Path) -> set[str] | None:
    """Names in a folder, listed once; None when it is not a folder."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries}
    except (FileNotFoundError, NotADirectoryError):
        return None


def exists(folder: Path, listing: set[str] | None, name: str) -> bool:
    if "/" in name or os.sep in name:  # a file in a subfolder: not in the listing
        return (folder / name).is_file()
    return listing is not None and name in listing


JPEG_TAIL_BYTES = 1024  # padding some writers append after the end-of-image marker fits in this


def jpeg_end_missing(path: Path) -> str | None:
    """Cheap truncation test without decoding: a complete JPEG ends with its end-of-image marker FF D9
    (it cannot occur inside the entropy-coded data, where FF is always followed by 00 or a restart marker)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - JPEG_TAIL_BYTES))
        tail = f.read()
    if b"\xff\xd9" not in tail:
        return "it ends without JPEG's end-of-image marker FF D9, so it is truncated"
    return None


def open_image(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) from the header, or from the decoded pixels when `decode`; else the reason. Without
    `decode`, a JPEG is still checked for truncation by its last bytes."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            elif im.format == "JPEG":
                reason = jpeg_end_missing(path)
                if reason is not None:
                    return None, reason
            return im.size, None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return None, describe_error(err)


def pool_map(fn: Callable, items: Sequence) -> list:
    if len(items) < 16:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        return list(pool.map(fn, items, chunksize=64))


def fmt(values: Iterable) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in values) + "]"


# --------------------------------------------------------------------------------------- boxes

def short_list(values: list, limit: int = 12) -> str:
    head = ", ".join(map(str, values[:limit]))
    return head + (f", ... ({len(values)} in all)" if len(values) > limit else "")


# ------------------------------------------------------------------------------------ VOC boxes

