"""One self-contained HTML page: headline metrics, tables, pictures embedded as data URIs, links to sources.
No script, no stylesheet or font from the network: the page renders the same offline and when moved."""
from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1200px;
       padding: 0 16px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; }
.sources { color: #555; font-size: 0.9em; } .sources code { background: #f4f4f4; padding: 1px 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.low td { background: #fdecea; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; margin-top: 4px; }
"""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]                      # first cell: a name; the rest numbers (NaN shown as n/a) or text
    caption: str = ""
    highlight_below: float | None = None  # rows whose second cell is below this get a red background


@dataclass
class Picture:
    title: str
    path: Path                            # a PNG written beside the report
    caption: str = ""


@dataclass
class Page:
    title: str
    metrics: Mapping[str, float]
    links: Mapping[str, str | None] = field(default_factory=dict)  # label -> href (relative) or None
    notes: Sequence[str] = ()
    tables: Sequence[Table] = ()
    pictures: Sequence[Picture] = ()


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _table(table: Table, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        low = (table.highlight_below is not None and len(row) > 1 and isinstance(row[1], float)
               and not math.isnan(row[1]) and row[1] < table.highlight_below)
        cells = "".join(f"<td>{_cell(v)}</td>" for v in row)
        attribute = ' class="low"' if low else ""
        body.append(f"<tr{attribute}>{cells}</tr>")
    caption = f"<p>{html.escape(table.caption)}</p>" if table.caption else ""
    return (f"<h2>{html.escape(table.title)}</h2>{caption}<table id=\"{table_id}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _picture(picture: Picture, directory: Path) -> str:
    data = base64.b64encode(picture.path.read_bytes()).decode("ascii")
    try:
        href = picture.path.relative_to(directory).as_posix()
    except ValueError:
        href = picture.path.as_uri()
    caption = html.escape(picture.caption)
    return (f"<h2>{html.escape(picture.title)}</h2><figure><img alt=\"{html.escape(picture.title)}\" "
            f"src=\"data:image/png;base64,{data}\"><figcaption>{caption} "
            f"(<a href=\"{html.escape(href)}\">{html.escape(picture.path.name)}</a>)</figcaption></figure>")


def render(page: Page, directory: Path) -> str:
    """The page as one HTML string; pictures are read from disk and embedded."""
    links = []
    for label, href in page.links.items():
        shown = (f"<a href=\"{html.escape(href)}\"><code>{html.escape(href)}</code></a>" if href
                 else "<em>not available</em>")
        links.append(f"<li>{html.escape(label)}: {shown}</li>")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in page.notes)
    headline = Table("metrics", ["metric", "value"], [[k, float(v)] for k, v in page.metrics.items()])
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(page.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(page.title)}</h1>",
        f"<div class=\"sources\"><ul>{''.join(links)}{notes}<li>written "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}</li></ul></div>",
        _table(headline, "metrics"),
        *(_table(t, f"table{i}") for i, t in enumerate(page.tables)),
        *(_picture(p, directory) for p in page.pictures),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_page(page: Page, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(page, path.parent), encoding="utf-8")
    return path


def relative_link(target: str | Path | None, directory: Path) -> str | None:
    """`target` as a link from `directory`: relative when both are on one tree, else a file:// URI."""
    if target is None:
        return None
    target = Path(target).resolve()
    try:
        return Path(os.path.relpath(target, directory.resolve())).as_posix()
    except ValueError:  # another drive
        return target.as_uri()


__all__ = ["Page", "Picture", "Table", "render", "write_page", "relative_link"]
