"""report.html: a report as one self-contained page to share a sweep: every table (sortable by a
click on its header), every figure (PNG embedded as base64, at screen resolution), the notes,
definitions and provenance. Nothing is fetched: a Content-Security-Policy forbids any network
access, so the page reads the same offline. reports.py decides what goes in; this module only
renders it.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# No network, no plugins: images only as data: URIs, style and script only inline.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1, h2 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0; }
th, td { padding: .25em .6em; border-bottom: 1px solid #e5e5e5; text-align: right;
         white-space: nowrap; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
thead th { border-bottom: 2px solid #444; background: #fafafa; }
th button { all: unset; cursor: pointer; }
th[aria-sort=ascending] button::after { content: " \\25B2"; }
th[aria-sort=descending] button::after { content: " \\25BC"; }
td.best { font-weight: 700; }
.caption, .note { font-size: 13px; color: #444; max-width: 60em; }
.note { background: #f4f4f4; padding: .4em .8em; border-left: 3px solid #999; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 13px; color: #555; }
code { font-size: 90%; }
"""

# Sort a table by the clicked column: by the cells' data-v numbers where they have one, else by
# their text; cells without a value ("-") go last in either direction.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    var button = document.createElement("button");
    button.type = "button";
    button.textContent = th.textContent;
    th.textContent = "";
    th.appendChild(button);
    th.setAttribute("aria-sort", "none");
    button.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var vx = x.hasAttribute("data-v") ? parseFloat(x.getAttribute("data-v")) : NaN;
        var vy = y.hasAttribute("data-v") ? parseFloat(y.getAttribute("data-v")) : NaN;
        var nx = x.hasAttribute("data-v"), ny = y.hasAttribute("data-v");
        if (nx !== ny) { return nx ? -1 : 1; }
        if (nx && isNaN(vx) !== isNaN(vy)) { return isNaN(vx) ? 1 : -1; }
        var order = nx ? (vx === vy ? 0 : (vx < vy ? -1 : 1))
                       : x.textContent.localeCompare(y.textContent);
        return up ? order : -order;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
document.documentElement.setAttribute("data-ready", "1");
"""


@dataclass
class Section:
    """One heading of the page: its tables (objects with `frame`, display strings; `bold`, a
    same-shaped bool frame; `caption`), notes, and figures as (title, PNG bytes)."""

    heading: str
    tables: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)


def sort_value(text: str) -> float | None:
    """The number a cell sorts by: its first number ("0.97 [0.96, 0.98]" -> 0.97), infinity for
    "never" or "inf", NaN for "-" or "nan" (no value); None for text (method names)."""
    t = str(text).strip().lower()
    if t in {"never", "inf", "infinity"}:
        return math.inf
    if t in {"-", "", "nan", "none"}:
        return math.nan
    m = NUMBER.match(t)
    return float(m.group()) if m else None


def inline(text: str) -> str:
    """Escaped text with Markdown's `code` and **bold** as HTML."""
    out = html.escape(str(text), quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _js_number(value: float) -> str:
    """As JavaScript's parseFloat reads it."""
    return "Infinity" if value == math.inf else "-Infinity" if value == -math.inf else repr(value)


def table_html(table, number: int) -> str:
    frame, bold = table.frame, table.bold
    head = "".join(f"<th scope=\"col\">{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for i in range(len(frame)):
        cells = []
        for j, col in enumerate(frame.columns):
            text = str(frame.iat[i, j])
            value = sort_value(text)
            attrs = "" if value is None else f" data-v=\"{_js_number(value)}\""
            attrs += " class=\"best\"" if bool(bold[col].iat[i]) else ""
            cells.append(f"<td{attrs}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = (f"<p class=\"caption\" id=\"table-{number}-caption\">{inline(table.caption)}</p>"
               if getattr(table, "caption", "") else "")
    return (f"<div class=\"scroll\"><table class=\"sortable\" id=\"table-{number}\">"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            f"{caption}")


def figure_html(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def render(title: str, summary: list[str], sections: list[Section], definitions: list[str],
           provenance: list[str]) -> str:
    """The page's HTML text. `summary`, `definitions`: paragraphs; `provenance`: Markdown list
    items ("- ...")."""
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{inline(p)}</p>" for p in summary)]
    number = 0
    for section in sections:
        body.append(f"<section><h2>{html.escape(section.heading)}</h2>")
        for table in section.tables:
            number += 1
            body.append(table_html(table, number))
        body += [f"<p class=\"note\">{inline(n)}</p>" for n in section.notes]
        body += [figure_html(t, p) for t, p in section.figures]
        body.append("</section>")
    if definitions:
        body += ["<section><h2>Definitions</h2>", *(f"<p>{inline(d)}</p>" for d in definitions),
                 "</section>"]
    items = "".join(f"<li>{inline(line.removeprefix('- '))}</li>" for line in provenance)
    body.append(f"<section><h2>Provenance</h2><ul>{items}</ul></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + f"<script>{SCRIPT}</script></body></html>\n")


def write_html(path: Path, title: str, summary: list[str], sections: list[Section],
               definitions: list[str], provenance: list[str]) -> Path:
    path = Path(path)
    path.write_text(render(title, summary, sections, definitions, provenance), encoding="utf-8")
    return path
