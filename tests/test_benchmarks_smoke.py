"""The benchmark scripts run end to end in quick mode and render a report (nothing is timed here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run_all  # noqa: E402
from benchmarks.common import Figure, machine_info, render_report  # noqa: E402

pytestmark = pytest.mark.slow

SECTIONS = {
    "bench_orchestration": "a. Orchestration overhead",
    "bench_sqlite_saver": "a. Orchestration overhead",
    "bench_checkpoints": "b. Checkpoint size",
    "bench_resume": "c. Resume latency",
}


def _rows(text: str, section: str) -> list[list[str]]:
    """The table rows of a report section, as lists of cells."""
    block = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [
        [cell.strip() for cell in line.strip("|").split(" | ")]
        for line in block.splitlines()
        if line.startswith("| ") and not line.startswith("| figure ")
    ]


def test_quick_benchmarks_produce_figures_and_a_report(tmp_path: Path) -> None:
    report = tmp_path / "REPORT.md"
    names = ",".join(SECTIONS)
    code = run_all.main(["--quick", "--repeats", "1", "--only", names, "--output", str(report)])
    text = report.read_text()
    assert code == 0, text
    assert text.startswith("# Benchmark report")
    assert "FAILED" not in text and "skipped" not in text
    for section in SECTIONS.values():
        title = next(line[3:] for line in text.splitlines() if line.startswith(f"## {section}"))
        rows = _rows(text, title)
        assert rows, f"no figures in {section}"
        for cells in rows:
            assert cells[2] != "0" and cells[3] not in ("–", "nan"), cells
    assert "| SQLite saves of one graph step" in text  # bench_sqlite_saver's row, in section a


def test_report_rendering_and_checks() -> None:
    passing = Figure("s", "fast", "ms", [1.0, 2.0, 3.0], [2.0, 2.0], target="<= 5 ms",
                     check=lambda f: f.median <= 5)
    failing = Figure("s", "slow", "ms", [9.0], check=lambda f: f.median <= 5, notes="why")
    assert passing.median == 2.0 and passing.spread == (1.0, 3.0) and passing.ratio == 1.0
    assert passing.passed is True and failing.passed is False and failing.ratio is None
    text = render_report([passing, failing], machine_info())
    assert "| fast | ms | 3 | 2 | 1..3 | 2 | 1.000 | <= 5 ms | pass |" in text
    assert "**FAIL**" in text and "**slow.** why" in text
