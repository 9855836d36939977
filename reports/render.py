"""The table structure shared by every report table, and its Markdown, CSV and LaTeX (booktabs) forms.

A `Table` is a stub column plus groups of columns (one group per method, as in the paper); its `Cell`s carry
the shown text, whether they are the best in their row, and for a missing cell the command that fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Cell:
    value: float | None = None
    text: str = ""
    bold: bool = False
    command: str | None = None  # a missing cell: the `bench run` that fills it

    @property
    def missing(self) -> bool:
        return self.command is not None


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


def to_markdown(table: Table) -> str:
    commands = table.commands
    footnote = {command: i for i, command in enumerate(commands, 1)}

    def show(cell: Cell) -> str:
        if cell.missing:
            return f"missing [{footnote[cell.command]}]"
        return f"**{cell.text}**" if cell.bold else cell.text

    lines = [f"**{table.title}.** {table.caption}", "", "| " + " | ".join(_flat_headers(table)) + " |",
             "|" + "---|" + "---:|" * len(table.columns)]
    lines += ["| " + " | ".join([label] + [show(c) for c in cells]) + " |" for label, cells in table.rows]
    lines += [""] + [f"{note}" for note in table.notes]
    lines += [f"[{i}] missing runs: `{command}`" for command, i in footnote.items()]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    """Numbers only (missing cells empty); the commands are in the Markdown and HTML forms."""
    rows = [[label] + [c.value if c.value is not None else None for c in cells] for label, cells in table.rows]
    return pd.DataFrame(rows, columns=_flat_headers(table)).to_csv(index=False)


LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                 "↑": r"$\uparrow$", "↓": r"$\downarrow$", "μ": r"$\mu$", "σ": r"$\sigma$", "–": "--"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular: method groups over their columns, bold best values, '--' for missing cells."""
    spec = "l" + "".join("r" * len(cols) for _, cols in table.groups)
    lines = [f"% {table.title}: {table.caption}".replace("\n", " "), rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    if any(group for group, _ in table.groups):
        heads, rules, start = [""], [], 2
        for group, cols in table.groups:
            heads.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{latex_escape(group)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
            start += len(cols)
        lines += [" & ".join(heads) + r" \\", " ".join(rules)]
    lines.append(" & ".join([latex_escape(table.stub)] + [latex_escape(label) for _, label, _ in table.columns]) + r" \\")
    lines.append(r"\midrule")
    for index, (label, cells) in enumerate(table.rows):
        if index in table.rules:
            lines.append(r"\midrule")
        shown = ["--" if c.missing else (rf"\textbf{{{latex_escape(c.text)}}}" if c.bold else latex_escape(c.text))
                 for c in cells]
        lines.append(" & ".join([latex_escape(label)] + shown) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(table: Table, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for suffix, render in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
        path = folder / f"{table.name}.{suffix}"
        path.write_text(render(table))
        written[f"{table.name}.{suffix}"] = path
    return written
