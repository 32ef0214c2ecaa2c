"""Rendering the report's sections: markdown (plots linked as PNG files beside it) and one
self-contained HTML page (plots inline as base64, every text escaped, no scripts, no external files)."""
from __future__ import annotations

import base64
import html
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .card import Section


def fence(text: str) -> str:
    """A markdown code fence longer than any run of backticks in `text`, so it cannot be closed early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def render_markdown(title: str, sections: list[Section]) -> str:
    cell = lambda c: c.replace("|", "\\|").replace("\n", " ")
    out = [f"# {title}\n"]
    for sec in sections:
        out.append(f"## {sec.title}\n")
        for block in sec.blocks:
            kind = block[0]
            if kind == "text":
                out.append(block[1] + "\n")
            elif kind == "table":
                _, header, rows = block
                out.append("\n".join(["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]) + "\n")
            elif kind == "plot":
                _, name, _, caption = block
                out.append(f"![{cell(caption)}](report-{name}.png)\n")
            elif kind == "samples":
                out.append("Sample responses:\n")
                for label, prompt, response in block[1]:
                    out.append(f"*{cell(label)}*\n\n" + fence(f"Q: {prompt}\nA: {response}") + "\n")
    return "\n".join(out)


CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}
pre{background:#f7f7f7;padding:.5em;white-space:pre-wrap;margin:.2em 0 .8em}nav a{margin-right:.8em}
code{background:#f3f3f3}"""


def inline(text: str) -> str:
    """Escaped text, with our own `key` spans as <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{e(title)}</h1><nav>"
           + "".join(f"<a href='#{e(s.id)}'>{e(s.id)}</a>" for s in sections) + "</nav>"]
    for sec in sections:
        out.append(f"<h2 id='{e(sec.id)}'>{e(sec.title)}</h2>")
        for block in sec.blocks:
            kind = block[0]
            if kind == "text":
                out.append(f"<p>{inline(block[1])}</p>")
            elif kind == "table":
                _, header, rows = block
                out.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in header) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                           + "</table>")
            elif kind == "plot":
                _, name, png, caption = block
                out.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                           f"<figcaption>{inline(caption)}</figcaption></figure>")
            elif kind == "samples":
                out.append("<p>Sample responses:</p>")
                for label, prompt, response in block[1]:
                    out.append(f"<p><em>{e(label)}</em></p><pre>Q: {e(prompt)}\nA: {e(response)}</pre>")
    out.append("</body></html>")
    return "\n".join(out)
