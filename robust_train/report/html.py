"""report.html: report.md as a web page, the PNG plots shown inline.

The markdown is our own (markdown.py), so this converts exactly the subset it writes: headings, tables,
bullet lists (two levels), paragraphs, images on a line of their own, `code` and **bold**. No markdown
package is needed; every piece of text is HTML-escaped, so run names and labels cannot inject markup.
"""

from __future__ import annotations

import html
import re

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s]+)\)$")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?( ± \d+(\.\d+)?)?$")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; font-size: 0.92em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def inline(text: str) -> str:
    """One line of our markdown as HTML: escaped, with `code` and **bold**."""
    out = html.escape(text, quote=True)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def table_html(lines: list[str]) -> str:
    """A markdown table (header, |---| rule, rows) as an HTML table; numbers right-aligned."""
    header, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in header) + "</tr></thead>"]
    out.append("<tbody>")
    for row in rows:
        tds = "".join(
            f'<td class="num">{inline(c)}</td>' if _NUMBER.match(c) else f"<td>{inline(c)}</td>" for c in row
        )
        out.append(f"<tr>{tds}</tr>")
    return "\n".join(out + ["</tbody>", "</table>"])


def _list_html(lines: list[str]) -> str:
    """Bullet lines `- x` with `  - y` sub-items under the item before them."""
    out = ["<ul>"]
    open_sub = False
    for line in lines:
        nested = line.startswith("  ") and len(out) > 1
        text = inline(line.strip()[2:])
        if nested and not open_sub:
            out[-1] = out[-1].removesuffix("</li>") + "<ul>"
            open_sub = True
        elif not nested and open_sub:
            out.append("</ul></li>")
            open_sub = False
        out.append(f"<li>{text}</li>")
    if open_sub:
        out.append("</ul></li>")
    return "\n".join(out + ["</ul>"])


def markdown_to_html(markdown: str, title: str = "robust-train report") -> str:
    """The whole page for a report.md text; images keep their relative paths (the PNGs lie beside it)."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            body.append(table_html(block))
        elif line.startswith("- "):
            block = []
            while i < len(lines) and (lines[i].startswith("- ") or lines[i].startswith("  - ")):
                block.append(lines[i])
                i += 1
            body.append(_list_html(block))
        elif (image := _IMAGE.match(line.strip())) is not None:
            alt, src = html.escape(image["alt"], quote=True), html.escape(image["src"], quote=True)
            body.append(f'<figure><img src="{src}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
            i += 1
        else:
            block = [inline(line)]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "![")):
                block.append(inline(lines[i]))
                i += 1
            body.append("<p>" + "\n".join(block) + "</p>")
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="en">',
                "<head>",
                '<meta charset="utf-8">',
                f"<title>{html.escape(title)}</title>",
                f"<style>{_STYLE}</style>",
                "</head>",
                "<body>",
                *body,
                "</body>",
                "</html>",
            ]
        )
        + "\n"
    )
