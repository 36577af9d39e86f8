"""README.md stays a short user guide, and every number it quotes is the generated files' number.

    python -m pytest -q tests/test_readme.py

The tables live in results/README.md (written by `python -m results report`, checked against the run
files by tests/test_results.py); the README copies one table and quotes a few numbers, checked here.
"""

import glob
import json
import re
from pathlib import Path

import pytest

from results.__main__ import report_paths
from results.grid import Grid

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS_README = ROOT / "results" / "README.md"
DOCS = [README, RESULTS_README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES = 300
MAX_WIDTH = 120  # a prose line, or one line of a command
MAX_TABLE_WIDTH = 160
# first folders of the repository paths the docs cite in backticks (`results/bundled/dtype.md`)
REPO_DIRS = ("lm_eval_dllm", "results", "docs", "policies", "tests", "train", "benchmarks")


def _table(text: str, header: str) -> list[str]:
    """The Markdown table that starts at the line `header`."""
    lines = text.splitlines()
    assert header in lines, f"no table with header {header!r}"
    i = lines.index(header)
    end = next((j for j in range(i, len(lines)) if not lines[j].startswith("|")), len(lines))
    return lines[i:end]


def _headings(text: str) -> set[str]:
    """GitHub's anchors for the file's headings (fenced code left out: its `#` lines are comments)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    out = set()
    for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-"))
    return out


def test_readme_is_a_short_guide():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, (f"README.md has {n} lines; valid: at most {MAX_LINES} (research narrative "
                            f"goes to docs/, generated tables to results/README.md)")


def _long_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every README line over its limit: MAX_WIDTH for prose and code (a long
    command becomes a multi-line shell block with `\\` continuations), MAX_TABLE_WIDTH for a table row,
    which cannot wrap."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        limit = MAX_TABLE_WIDTH if line.startswith("|") and line.rstrip().endswith("|") else MAX_WIDTH
        if len(line) > limit:
            out.append((n, line))
    return out


def test_long_lines_are_found():
    text = "x" * MAX_WIDTH + "\n" + "y" * (MAX_WIDTH + 1) + "\n| " + "z" * MAX_WIDTH + " |\n"
    assert [n for n, _ in _long_lines(text)] == [2]
    assert _long_lines("| " + "z" * MAX_TABLE_WIDTH + " |") != []


def test_readme_lines_are_short():
    bad = _long_lines(README.read_text())
    assert not bad, "README.md lines too long (prose and commands at most %d characters, table rows %d): %s" % (
        MAX_WIDTH, MAX_TABLE_WIDTH, [(n, len(line)) for n, line in bad])


def test_headline_table_is_the_generated_one():
    """Every cell of the README's testbed table is the cell results/README.md has."""
    readme = README.read_text()
    header = next(x for x in readme.splitlines() if x.startswith("| sampler ") and "acc % (B = 8)" in x)
    mine = _table(readme, header)
    assert len(mine) >= 4
    assert mine == _table(RESULTS_README.read_text(), header)


def test_headline_sentence_quotes_the_generated_summary():
    readme = " ".join(README.read_text().split())
    m = re.search(r"At full diffusion, within the (.*?) in \[`results/README.md`\]", readme)
    assert m, "the README's learned-vs-heuristic sentence is gone"
    summary = next(x for x in RESULTS_README.read_text().splitlines() if x.startswith("- full diffusion"))
    quoted = re.findall(r"\d+\.\d+", m.group(1))
    assert len(quoted) >= 3
    for number in quoted:
        assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", summary), (number, summary)


@pytest.mark.skipif(not (ROOT / "results" / "runs").exists(), reason="no committed results")
def test_quick_start_output_is_the_committed_run():
    """The lm-eval table pasted under Quick start holds the numbers of the results grid's run of the same
    setting (wall_s aside: seconds on whatever machine ran it)."""
    runs = report_paths(Grid(tasks=["modchain"], blocks=[], samplers=[], out=ROOT / "results"))
    (run,) = [p for p in runs if p.name == "threshold-tau0.9-B8.json" and "bfloat16" in p.parent.name]
    got = json.loads(run.read_text())["results"]["modchain"]
    rows, filt = [], None
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and re.fullmatch(r"\d+\.\d{4}", cells[6]):  # a metric row
            filt = cells[2] or filt
            rows.append((filt, cells[4], cells[6], cells[8]))
    assert {r[1] for r in rows} == {k.split(",")[0] for k in got if "," in k and "_stderr" not in k}  # every one
    for filt, metric, value, stderr in rows:
        if metric == "wall_s":
            continue
        assert value == f"{got[f'{metric},{filt}']:.4f}", (filt, metric)
        se = got[f"{metric}_stderr,{filt}"]
        assert stderr == (se if se == "N/A" else f"{se:.4f}"), (filt, metric)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_cited_paths_exist(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.name}: link {target} points nowhere"
        if anchor:
            assert anchor in _headings(dest.read_text()), f"{doc.name}: no heading for #{anchor} in {dest.name}"
    for cited in re.findall(r"`([\w./*-]+/[\w./*-]*)`", text):
        first = cited.split("/")[0]
        if first == "grpo_logs":  # the docs name GRPO logs by their folder's name
            cited = "results/bundled/" + cited
        elif first not in REPO_DIRS:
            continue
        assert glob.glob(str(ROOT / cited)), f"{doc.name}: `{cited}` does not exist"
