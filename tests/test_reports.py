"""Reports built from real records of a tiny run: tables, LaTeX, missing-cell commands, and the page in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.config import get_preset
from bench.orchestrate import run_local
from bench.sweep import Sweep, build_specs
from reports import render, tables
from reports.build import build_report

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_cache):
    """Records of original and safemax on classes 0-1 (plus safemax lambda=0 on class 0), and their report."""
    root = tmp_path_factory.mktemp("reports")
    results, preset = root / "results", get_preset("tiny")
    common = dict(results=str(results), cache=tiny_cache, device="cpu", progress=False)
    specs = build_specs(preset, ["original", "safemax"], [0, 1], [0], Sweep({}, {}), **common)
    specs += build_specs(preset, ["safemax"], [0], [0], Sweep({"safemax": {"lam": [0.0]}}, {}), **common)
    outcomes = run_local(specs)
    assert [o.status for o in outcomes] == ["done"] * len(specs), [o.error for o in outcomes]
    written = build_report(results, root / "out", figure1_points=12)
    # the paper's grid asked for: SA without records, all ten classes (issue 26: otherwise only what has records)
    asked = build_report(results, root / "asked", figure1=False, methods=["original", "sa", "safemax"],
                         classes=list(range(10)))
    return {"results": results, "out": root / "out", "written": written, "asked": asked,
            "records": [o.record for o in outcomes], "cache": tiny_cache}


@pytest.mark.slow
def test_report_writes_tables_figures_and_page(report):
    written = report["written"]
    for name in ("table1", "table2", "prepare", "paired"):
        for suffix in ("md", "csv", "tex"):
            assert f"tiny/paper/tables/{name}.{suffix}" in written
    for name in ("samples_class0", "samples_class1", "sweep_safemax_lam_class0", "cost", "tradeoff", "per_class",
                 "noise_prediction"):
        for suffix in ("png", "pdf"):
            assert written[f"tiny/paper/figures/{name}.{suffix}"].stat().st_size > 0
    assert written["tiny/figure1_latents.png"].stat().st_size > 0
    assert len(pd.read_csv(written["runs.csv"])) == len(report["records"])
    assert written["report.html"] == (report["out"] / "report.html").resolve()


def test_table1_holds_the_records_values(report):
    frame = pd.read_csv(report["written"]["tiny/paper/tables/table1.csv"])
    safemax = next(r for r in report["records"] if r["method"] == "safemax" and r["forget_class"] == 1
                   and r["variant"] == "default")
    row = frame[frame["Class"].astype(str) == "1"].iloc[0]
    assert row["SAFEMax UA (%) ↑"] == pytest.approx(safemax["metrics"]["ua"])
    assert row["SAFEMax H ↑"] == pytest.approx(safemax["metrics"]["entropy"])
    assert list(frame["Class"].astype(str)) == ["0", "1"]  # the classes that have records
    asked = pd.read_csv(report["asked"]["tiny/paper/tables/table1.csv"])
    assert pd.isna(asked[asked["Class"].astype(str) == "5"].iloc[0]["SAFEMax UA (%) ↑"])


def test_missing_cells_carry_the_command_that_fills_them(report):
    markdown = report["asked"]["tiny/paper/tables/table1.md"].read_text()
    results = report["results"]
    command = (f"bench run --preset tiny --protocol paper --methods safemax --classes 2-9 --seeds 0 "
               f"--results {results} --cache {report['cache']}")
    number = re.search(rf"\[(\d+)\] missing runs: `{re.escape(command)}`", markdown).group(1)
    row5 = next(line for line in markdown.splitlines() if line.startswith("| 5 |"))
    assert f"missing [{number}]" in row5
    # Means over 2 of the 10 classes are starred, and the note says why (it is left out when none is partial).
    table2 = report["asked"]["tiny/paper/tables/table2.md"].read_text()
    assert "over fewer classes than the table has" in table2 and re.search(r"\| μ \|[^\n]*\*", table2)
    # SA was asked for: it gets a column, and a command, before anyone runs it.
    assert "--methods sa --classes 0-9" in markdown
    page = report["asked"]["report.html"].read_text()
    cells = re.findall(r"<td class='missing' data-command='([^']*)'><a href='#([^']*)'", page)
    assert cells
    for cell_command, anchor in cells:
        assert re.search(rf"<li id='{anchor}'><code>{re.escape(cell_command)}</code></li>", page)


def test_best_value_is_bold_per_row_among_unlearning_methods():
    grid = [("A", [("UA", "ua"), ("FID", "fid")]), ("B", [("UA", "ua"), ("FID", "fid")]),
            ("Original", [("UA", "ua"), ("FID", "fid")])]
    table = render.Table("t", "T", "", "Class", grid, rank_groups=[True, True, False])
    cells = [render.Cell(v, f"{v:.2f}") for v in (90.0, 20.0, 100.0, 25.0, 0.0, 5.0)]
    table.rows.append(("0", cells))
    render.mark_best(table, {"ua": True, "fid": False})
    assert [c.bold for c in cells] == [False, True, True, False, False, False]
    assert r"\textbf{100.00}" in render.to_latex(table)


def _tabular_columns(row: str) -> int:
    """Cells a LaTeX row spans, counting \\multicolumn{n} as n."""
    spans = [int(n) for n in re.findall(r"\\multicolumn\{(\d+)\}", row)]
    return row.count("&") + 1 - len(spans) + sum(spans)


def test_latex_tables_are_booktabs_tabulars(report):
    for key, path in report["written"].items():
        if not key.endswith(".tex"):
            continue
        text = path.read_text()
        assert text.index(r"\begin{table}") < text.index(r"\caption{") < text.index(r"\begin{tabular}"), key
        assert text.rstrip().endswith(r"\end{table}"), key
        body = text[text.index(r"\begin{tabular}"):text.rindex(r"\end{tabular}") + len(r"\end{tabular}")]
        spec = re.match(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1)
        assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule"), key
        rows = [line for line in body.splitlines() if line.rstrip().endswith(r"\\")]
        assert rows and {_tabular_columns(row) for row in rows} == {len(spec)}, key
        unescaped = body.replace(r"\{", "").replace(r"\}", "")
        assert unescaped.count("{") == unescaped.count("}"), key


def test_paper_comparison_table_for_cifar10(report):
    frame = tables.records_frame(report["records"])
    grid = tables.make_grid(frame, "cifar10", "paper", "results")
    table = tables.paper_table(frame.assign(preset="cifar10"), grid)
    markdown = render.to_markdown(table)
    # The tiny preset's records measure a classifier-feature FD: named so beside the paper's FID.
    assert "| FD (classifier features) μ (paper: FID) | 17.71 | missing [1] | 16.76 | missing [2] | 16.74 |" in markdown
    assert "--methods sa --classes 0-9 --seeds 0 --results results --data-root DATA_ROOT" in markdown


@pytest.mark.slow
def test_a_table_of_records_from_two_devices_says_their_seconds_do_not_compare(report, tmp_path, caplog):
    from bench import records

    results = tmp_path / "results"
    shutil.copytree(report["results"], results)
    found, _ = records.read_all(results)
    assert "ran on 2 devices" not in report["written"]["report.html"].read_text()  # one device: no note
    moved = next(r for r in found if r["method"] == "safemax")
    path = Path(moved.pop("path"))
    records.write_json_atomic(path, {**moved, "provenance": {**moved["provenance"], "device": "NVIDIA H100 80GB HBM3"}})
    with caplog.at_level("WARNING"):
        page = build_report(results, tmp_path / "out", figure1=False)["report.html"].read_text()
    here = moved["provenance"]["device"]
    assert (f"The records of tiny/paper ran on 2 devices ({here}: {len(found) - 1}, NVIDIA H100 80GB HBM3: 1). Their "
            "RTE and peak memory compare only between runs on one device") in page
    assert "the records of tiny/paper ran on 2 devices" in caplog.text


def test_records_of_a_method_not_importable_here_are_noted_as_not_checked(report, tmp_path, caplog):
    from bench import records

    results = tmp_path / "results"
    shutil.copytree(report["results"], results)
    moved = next(r for r in records.read_all(results)[0] if r["method"] == "original" and r["forget_class"] == 0)
    Path(moved.pop("path")).unlink()  # as a plug-in's record, from a machine where it was installed
    ghost = {**moved, "method": "ghost", "provenance": {**moved["provenance"], "extensions": ["method-module:gone:G"]}}
    records.write_json_atomic(records.run_dir(results, "tiny", "paper", "ghost", "default", 0, 0) / records.RECORD_NAME,
                              ghost)
    with caplog.at_level("WARNING"):
        page = build_report(results, tmp_path / "out", figure1=False)["report.html"].read_text()
    assert ("The code of 1 record(s) was not checked against the code now: their method cannot be imported here "
            "(ghost: 1)") in page
    assert "the code of 1 record(s) was not checked" in caplog.text


def test_empty_results_folder_gives_a_page_not_an_error(tmp_path):
    written = build_report(tmp_path / "nothing", tmp_path / "out", figure1=False)
    assert "No records under" in written["report.html"].read_text()


PROBE = ("<script>window.addEventListener('load', function () {"
         "  var out = [];"
         "  document.querySelectorAll('img').forEach(function (i) { out.push(i.naturalWidth + 'x' + i.naturalHeight); });"
         "  document.querySelectorAll('table').forEach(function (t) {"
         "    out.push('table:' + t.offsetWidth + 'x' + t.offsetHeight); });"
         "  document.querySelectorAll('div.scroll').forEach(function (d) {"
         "    out.push('box:' + d.offsetWidth + 'x' + document.body.clientWidth); });"
         "  var p = document.createElement('pre'); p.id = 'probe'; p.textContent = out.join(' ');"
         "  document.body.appendChild(p); });</script>")


def _chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_page_renders_offline_in_chromium(report, tmp_path):
    assert CHROMIUM is not None, "Debian's chromium package is missing: `make install` installs it"
    page = report["written"]["report.html"]
    html = page.read_text()
    assert not re.search(r"(src|href)=['\"](https?:|//)", html), "the page must not load anything from outside"
    images = re.findall(r"<img src='([^']{0,30})", html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)

    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom).group(1).split()
    sizes = [tuple(map(int, s.split("x"))) for s in found if ":" not in s]
    boxes = [tuple(map(int, s[6:].split("x"))) for s in found if s.startswith("table:")]
    assert len(sizes) == len(images) and all(w > 0 and h > 0 for w, h in sizes), sizes
    assert len(boxes) == html.count("<table") and all(w > 0 and h > 0 for w, h in boxes), boxes
    # Every table sits in its own scrolling box that never overflows the page, however wide the table is.
    scrolls = [tuple(map(int, s[4:].split("x"))) for s in found if s.startswith("box:")]
    assert len(scrolls) == html.count("<table") and all(0 < width <= page for width, page in scrolls), scrolls

    shot = tmp_path / "page.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1400) and pixels.std() > 20, "blank screenshot"


def test_run_summary_gives_cost_ratios_in_flops_and_seconds(report):
    """The summary `bench run` prints ends with each method's unlearning TFLOPs and both ratios to SAFEMax."""
    from reports.frame import runs_frame
    from reports.summary import efficiency, efficiency_text

    runs = [r for r in report["records"] if r["variant"] == "default"]
    table = efficiency(runs_frame(runs)).set_index("method")
    flops = {r["method"]: r["timings"]["flops"]["train"] / 1e12 for r in runs}
    assert table.loc["safemax", "train_tflops"] == pytest.approx(flops["safemax"]) and flops["safemax"] > 0
    assert table.loc["safemax", "tflops_vs_safemax"] == 1.0 and table.loc["safemax", "rte_vs_safemax"] == 1.0
    assert table.loc["original", "tflops_vs_safemax"] == 0.0
    # The loop's rate: its FLOPs over its seconds; a method without a loop has none (not 0, not infinite).
    safemax = [r["timings"] for r in runs if r["method"] == "safemax"]
    rate = sum(t["flops"]["train"] for t in safemax) / sum(t["rte_s"] for t in safemax) / 1e9
    assert table.loc["safemax", "train_gflop_s"] == pytest.approx(rate)
    assert pd.isna(table.loc["original", "train_gflop_s"])
    text = efficiency_text(runs_frame(runs))
    assert "train_tflops" in text and "train_gflop_s" in text
