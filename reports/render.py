"""The table structure shared by every report table, and its Markdown, CSV and LaTeX (booktabs) forms.

A `Table` is a stub column plus groups of columns (one group per method, as in the paper); its `Cell`s carry
the shown text, whether they are the best in their row, for a missing cell the command that fills it, and for a
statistic its n, standard deviation and 95% CI (`reports.stats.Summary`): shown as "mean ± sd [low, high]", or
"mean (n=1)" where one value gives neither.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reports.stats import Summary


@dataclass
class Cell:
    value: float | None = None
    text: str = ""  # the value as shown (the mean for a statistic); bold applies to it
    bold: bool = False
    command: str | None = None  # a missing cell: the `bench run` that fills it
    stats: Summary | None = None  # n, sd and CI behind `value`
    spec: str = "{:.2f}"  # format of the sd and the CI bounds

    @property
    def missing(self) -> bool:
        return self.command is not None

    @property
    def n(self) -> int | None:
        return self.stats.n if self.stats else None

    def sd_text(self) -> str:
        return self.spec.format(self.stats.std) if self.stats and self.stats.n > 1 else ""

    def ci_text(self) -> str:
        """'[low, high]', 'n=1' where one value gives no interval, or '' for a cell without statistics."""
        if not self.stats:
            return ""
        if self.stats.has_interval:
            return f"[{self.spec.format(self.stats.low)}, {self.spec.format(self.stats.high)}]"
        return f"n={self.stats.n}"

    def extra_n(self, typical: int | None) -> str:
        """'n=k' for a cell whose n differs from the table's usual one (n=1 says so in its CI slot already)."""
        n = self.n
        return f"n={n}" if n is not None and n > 1 and n != typical else ""


def stat_cell(summary: Summary | None, text_of, spec: str = "{:.2f}") -> Cell:
    """A Cell for a Summary: `text_of(mean)` shown; '–' when there is no value."""
    if summary is None or summary.n == 0 or math.isnan(summary.mean):
        return Cell(None, "–")
    return Cell(summary.mean, text_of(summary.mean), stats=summary, spec=spec)


def typical_n(table) -> int | None:
    """The most common n among the table's statistic cells (the one its note states)."""
    counts = Counter(c.n for _, cells in table.rows for c in cells if c.n)
    return counts.most_common(1)[0][0] if counts else None


def add_stats_note(table, unit: str) -> None:
    """State n and what the intervals are, under a table whose cells hold statistics."""
    n = typical_n(table)
    if n is None:
        return
    table.notes.append(
        f"Cells: mean ± sd [95% CI, percentile bootstrap over {unit}]; n = {n} {unit} per cell unless the cell "
        "says n=k; 'n=1': a single value, no sd or CI.")


@dataclass
class Table:
    name: str  # file stem
    title: str
    caption: str
    stub: str  # header of the row-label column
    groups: list[tuple[str, list[tuple[str, str]]]]  # (group label, [(column label, metric)])
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)
    rules: set[int] = field(default_factory=set)  # a \midrule before these rows
    notes: list[str] = field(default_factory=list)
    rank_groups: list[bool] | None = None  # which groups take part in bolding (default: all)

    @property
    def columns(self) -> list[tuple[str, str, str]]:
        return [(group, label, metric) for group, cols in self.groups for label, metric in cols]

    @property
    def commands(self) -> list[str]:
        return list(dict.fromkeys(c.command for _, cells in self.rows for c in cells if c.command))


def mark_best(table: Table, higher: dict[str, bool]) -> None:
    """Bold, in each row and for each metric, the best value across the ranked groups (ties all bold), as the
    paper does; standard-deviation rows (label 'σ') are best when lowest."""
    ranked = table.rank_groups or [True] * len(table.groups)
    slots: dict[int, list[int]] = {}
    index = 0
    for (_, cols), ranks in zip(table.groups, ranked):
        for position in range(len(cols)):
            if ranks:
                slots.setdefault(position, []).append(index + position)
        index += len(cols)
    metrics = [metric for _, _, metric in table.columns]
    for label, cells in table.rows:
        for indices in slots.values():
            shown = [(float(cells[i].text.strip("*")), i) for i in indices if cells[i].value is not None]
            if len(shown) < 2:
                continue
            best = max if higher.get("std" if label == "σ" else metrics[indices[0]], False) else min
            target = best(value for value, _ in shown)
            for value, i in shown:
                cells[i].bold = value == target


def _flat_headers(table: Table) -> list[str]:
    return [table.stub] + [f"{group} {label}".strip() for group, label, _ in table.columns]


def plain_text(cell: Cell, typical: int | None, bold: tuple[str, str] = ("", "")) -> str:
    """'mean ± sd [low, high]' (the mean wrapped in `bold` when the cell is best), 'mean (n=1)', or the text."""
    mean = f"{bold[0]}{cell.text}{bold[1]}" if cell.bold else cell.text
    if not cell.stats:
        return mean
    sd, ci, extra = cell.sd_text(), cell.ci_text(), cell.extra_n(typical)
    if not sd:
        return f"{mean} ({ci})"
    return f"{mean} ± {sd} {ci}" + (f" ({extra})" if extra else "")


def to_markdown(table: Table) -> str:
    commands = table.commands
    footnote = {command: i for i, command in enumerate(commands, 1)}
    typical = typical_n(table)

    def show(cell: Cell) -> str:
        if cell.missing:
            return f"missing [{footnote[cell.command]}]"
        return plain_text(cell, typical, ("**", "**"))

    lines = [f"**{table.title}.** {table.caption}", "", "| " + " | ".join(_flat_headers(table)) + " |",
             "|" + "---|" + "---:|" * len(table.columns)]
    lines += ["| " + " | ".join([label] + [show(c) for c in cells]) + " |" for label, cells in table.rows]
    lines += [""] + [f"{note}" for note in table.notes]
    lines += [f"[{i}] missing runs: `{command}`" for command, i in footnote.items()]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    """Numbers only (missing cells empty); a column with statistics gets sd, CI low, CI high and n columns beside
    it. The commands are in the Markdown and HTML forms."""
    headers = _flat_headers(table)
    with_stats = [any(cells[i].stats for _, cells in table.rows) for i in range(len(table.columns))]
    columns = [headers[0]]
    for header, stats in zip(headers[1:], with_stats):
        columns += [header] + ([f"{header} sd", f"{header} CI low", f"{header} CI high", f"{header} n"] if stats else [])
    rows = []
    for label, cells in table.rows:
        row = [label]
        for cell, stats in zip(cells, with_stats):
            row.append(cell.value)
            if stats:
                found = cell.stats
                row += [found.std, found.low, found.high, found.n] if found else [None] * 4
        rows.append(row)
    return pd.DataFrame(rows, columns=columns).to_csv(index=False)


LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                 "↑": r"$\uparrow$", "↓": r"$\downarrow$", "μ": r"$\mu$", "σ": r"$\sigma$", "–": "--",
                 "±": r"$\pm$", "λ": r"$\lambda$", "Δ": r"$\Delta$", "é": r"\'e", "…": r"\ldots{}",
                 "−": "-", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(cell: Cell, typical: int | None) -> str:
    """Mean ± sd with the CI under it in small type (a nested tabular: plain LaTeX, no extra package)."""
    if cell.missing:
        return "--"
    mean = rf"\textbf{{{latex_escape(cell.text)}}}" if cell.bold else latex_escape(cell.text)
    if not cell.stats:
        return mean
    sd, ci, extra = cell.sd_text(), cell.ci_text(), cell.extra_n(typical)
    if not sd:
        return rf"{mean} {{\scriptsize ({latex_escape(ci)})}}"
    under = latex_escape(ci + (f" {extra}" if extra else ""))
    return rf"\begin{{tabular}}[c]{{@{{}}r@{{}}}}{mean}$\pm${latex_escape(sd)}\\ {{\scriptsize {under}}}\end{{tabular}}"


NUMBERED = re.compile(r"^Table \d+\.\s*")  # LaTeX numbers the float itself: "Table 2. X" -> \caption{X}


def to_latex(table: Table, label: str | None = None) -> str:
    """A booktabs table float: caption, label, method groups over their columns, bold best values, '--' for missing
    cells, and the table's notes as footnotes under the tabular. Needs \\usepackage{booktabs} only."""
    spec = "l" + "".join("r" * len(cols) for _, cols in table.groups)
    typical = typical_n(table)
    lines = [f"% {table.title} (generated by bench report)", r"\begin{table}[tbp]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(NUMBERED.sub('', table.title))}. {latex_escape(table.caption)}}}",
             rf"\label{{tab:{label or table.name}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if any(group for group, _ in table.groups):
        heads, rules, start = [""], [], 2
        for group, cols in table.groups:
            heads.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{latex_escape(group)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
            start += len(cols)
        lines += [" & ".join(heads) + r" \\", " ".join(rules)]
    lines.append(" & ".join([latex_escape(table.stub)] + [latex_escape(label) for _, label, _ in table.columns]) + r" \\")
    lines.append(r"\midrule")
    for index, (row_label, cells) in enumerate(table.rows):
        if index in table.rules:
            lines.append(r"\midrule")
        lines.append(" & ".join([latex_escape(row_label)] + [_latex_cell(c, typical) for c in cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = list(table.notes) + (["--: no record yet (the Markdown and HTML tables give the command that runs it)."]
                                 if table.commands else [])
    if notes:
        lines += [r"\par\smallskip", r"\begin{minipage}{\linewidth}\footnotesize\raggedright"]
        lines += [latex_escape(note) + (r"\par" if i < len(notes) - 1 else "") for i, note in enumerate(notes)]
        lines.append(r"\end{minipage}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(table: Table, folder: Path, label: str | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    renders = {"md": to_markdown, "csv": to_csv, "tex": lambda t: to_latex(t, label)}
    for suffix, render in renders.items():
        path = folder / f"{table.name}.{suffix}"
        path.write_text(render(table))
        written[f"{table.name}.{suffix}"] = path
    return written
