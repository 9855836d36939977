"""One self-contained report.html: tables as HTML, figures embedded as base64 PNG, inline CSS, no scripts and
no external resources, so the page opens offline and can be mailed as one file."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reports.frame import fid_label
from reports.render import Cell, Table, typical_n

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.6em; }
table.results { border-collapse: collapse; font-size: 12px; margin: .5em 0; }
table.results th, table.results td { padding: 2px 7px; text-align: right; border: none; white-space: nowrap; }
table.results th { font-weight: 600; }
table.results thead tr:first-child th { border-top: 2px solid #222; }
table.results thead tr:last-child th { border-bottom: 1px solid #222; }
table.results tbody tr:last-child td { border-bottom: 2px solid #222; }
table.results tr.rule td { border-top: 1px solid #222; }
table.results th.group { text-align: center; border-bottom: 1px solid #888; }
table.results td.stub, table.results th.stub { text-align: left; }
td.missing a { color: #a33; text-decoration: none; font-size: 11px; }
p.caption { font-size: 13px; color: #444; max-width: 1100px; }
ol.commands { font-size: 12px; } ol.commands code, .note code { background: #f4f4f4; padding: 1px 4px; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #444; max-width: 1100px; }
.note { background: #fff8e5; border-left: 4px solid #e0b000; padding: .4em .8em; font-size: 13px; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
div.scroll { overflow: auto; max-width: 100%; max-height: 80vh; border: 1px solid #e4e4e4; margin: .5em 0; }
div.scroll table.results { margin: 0; }
div.scroll thead th { position: sticky; top: 0; background: #fff; }
div.scroll td.stub, div.scroll th.stub { position: sticky; left: 0; background: #fff; }
span.ci { display: block; font-size: 10px; color: #666; }
"""


@dataclass
class FigureEntry:
    title: str
    caption: str
    png: Path


@dataclass
class Subsection:
    """A titled part of a section (the robustness results): its lines, tables and figures."""

    name: str
    title: str
    lines: list[str]
    tables: list[Table]
    figures: list[FigureEntry]


@dataclass
class Section:
    """Everything one (preset, protocol) contributes to the page."""

    preset: str
    protocol: str
    tables: list[Table]
    figures: list[FigureEntry]
    runs: pd.DataFrame
    commands: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    subsections: list[Subsection] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return f"{self.preset}-{self.protocol}"


def esc(text) -> str:
    return html.escape(str(text))


def cell_html(cell: Cell, typical: int | None) -> str:
    """Mean (bold when best) ± sd, the CI on a small line under it ('n=1' where there is none)."""
    mean = f"<strong>{esc(cell.text)}</strong>" if cell.bold else esc(cell.text)
    if not cell.stats:
        return f"<td>{mean}</td>"
    sd, extra = cell.sd_text(), cell.extra_n(typical)
    under = cell.ci_text() + (f" {extra}" if extra else "")
    return f"<td>{mean}{' ± ' + esc(sd) if sd else ''}<span class='ci'>{esc(under)}</span></td>"


def table_html(table: Table, anchor: str) -> str:
    """A paper-style table in its own scrolling box; a missing cell links to the command (listed under the table)
    that fills it."""
    commands = table.commands
    typical = typical_n(table)
    number = {command: i for i, command in enumerate(commands, 1)}
    prefix = f"{anchor}-{table.name}-cmd"
    head = []
    if any(group for group, _ in table.groups):
        head.append("<tr><th class='stub'></th>" + "".join(
            f"<th class='group' colspan='{len(cols)}'>{esc(group)}</th>" for group, cols in table.groups) + "</tr>")
    head.append(f"<tr><th class='stub'>{esc(table.stub)}</th>" +
                "".join(f"<th>{esc(label)}</th>" for _, label, _ in table.columns) + "</tr>")
    body = []
    for index, (label, cells) in enumerate(table.rows):
        tds = []
        for cell in cells:
            if cell.missing:
                n = number[cell.command]
                tds.append(f"<td class='missing' data-command='{esc(cell.command)}'><a href='#{prefix}{n}' "
                           f"title='{esc(cell.command)}'>missing [{n}]</a></td>")
            else:
                tds.append(cell_html(cell, typical))
        row_class = " class='rule'" if index in table.rules else ""
        body.append(f"<tr{row_class}><td class='stub'>{esc(label)}</td>{''.join(tds)}</tr>")
    parts = [f"<h3 id='{anchor}-{table.name}'>{esc(table.title)}</h3>", f"<p class='caption'>{esc(table.caption)}</p>",
             f"<div class='scroll'><table class='results' data-table='{table.name}'><thead>{''.join(head)}</thead>"
             f"<tbody>{''.join(body)}</tbody></table></div>"]
    parts += [f"<p class='caption'>{esc(note)}</p>" for note in table.notes]
    if commands:
        items = "".join(f"<li id='{prefix}{i}'><code>{esc(c)}</code></li>" for c, i in number.items())
        parts.append(f"<p class='caption'>Missing runs; each command fills the cells marked with its number:</p>"
                     f"<ol class='commands'>{items}</ol>")
    return "\n".join(parts)


def figure_html(entry: FigureEntry) -> str:
    data = base64.b64encode(entry.png.read_bytes()).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{esc(entry.title)}'>"
            f"<figcaption><strong>{esc(entry.title)}.</strong> {esc(entry.caption)}</figcaption></figure>")


def runs_html(runs: pd.DataFrame) -> str:
    columns = ["method", "variant", "class", "seed", "ua", "entropy", "fid", "retain_accuracy", "rte_s",
               "prepare_total_s", "memory_gib", "memory_kind", "noise_top_class", "device"]
    shown = runs[[c for c in columns if c in runs]].sort_values(["method", "variant", "class", "seed"])
    shown = shown.rename(columns={"fid": fid_label(runs["fid_features"])})
    table = shown.to_html(index=False, classes="results", float_format=lambda v: f"{v:.3f}", border=0)
    return (f"<details><summary>All {len(shown)} runs (every variant and seed; runs.csv holds every column)"
            f"</summary><div class='scroll'>{table}</div></details>")


def subsection_html(sub: Subsection, anchor: str) -> str:
    parts = [f"<h3 id='{anchor}-{sub.name}'>{esc(sub.title)}</h3>"]
    parts += [f"<p class='caption'>{esc(line)}</p>" for line in sub.lines]
    parts += [table_html(table, anchor) for table in sub.tables]
    parts += [figure_html(entry) for entry in sub.figures]
    return "\n".join(parts)


def section_html(section: Section) -> str:
    parts = [f"<h2 id='{section.anchor}'>Preset {esc(section.preset)}, protocol {esc(section.protocol)}</h2>"]
    parts += [f"<p class='caption'>{esc(fact)}</p>" for fact in section.facts]
    parts += [table_html(table, section.anchor) for table in section.tables]
    parts += [figure_html(entry) for entry in section.figures]
    parts += [subsection_html(sub, section.anchor) for sub in section.subsections]
    parts.append(runs_html(section.runs))
    return "\n".join(parts)


def page(title: str, intro: list[str], preset_figures: dict[str, list[FigureEntry]], sections: list[Section],
         notes: list[str]) -> str:
    """The whole page; `preset_figures` are the per-preset figures (Figure 1) shown before that preset's sections."""
    toc = "".join(f"<li><a href='#{s.anchor}'>{esc(s.preset)} / {esc(s.protocol)}</a></li>" for s in sections)
    body = [f"<h1>{esc(title)}</h1>"] + [f"<p>{esc(line)}</p>" for line in intro]
    body += [f"<p class='note'>{note}</p>" for note in notes]  # notes carry their own markup
    body.append(f"<ul>{toc}</ul>" if toc else "")
    shown = set()
    for section in sections:
        if section.preset not in shown:
            shown.add(section.preset)
            body += [figure_html(entry) for entry in preset_figures.get(section.preset, [])]
        body.append(section_html(section))
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{STYLE}</style></head>"
            f"<body>\n{''.join(body)}\n</body></html>\n")
