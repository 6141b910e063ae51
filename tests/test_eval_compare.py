"""eval compare on hand-made score folders: paired deltas, seeded bootstrap intervals, changed items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_fixtures import invoke
from interleave_thinker.evaluation.compare import compare_runs, percentile
from interleave_thinker.evaluation.wise import VERIFIED

CATEGORY = {n: name for name, low, high in VERIFIED.ranges for n in range(low, high + 1)}
A = {1: 1, 2: 0, 3: 0, 4: 1, 401: 0, 402: 0, 530: 1, 700: 0, 800: 1, 900: 0}
B = {**A, 2: 1, 401: 1, 800: 0, 901: 1}  # 901 is only in B


def _scored_dir(folder: Path, values: dict[int, int], judge: str = "judge-x") -> Path:
    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(json.dumps({
        "benchmark": "wise-verified", "protocol": "wise-verified", "judge": judge, "metric": "m",
        "overall": None, "categories": {}, "items": len(values), "judged": len(values),
        "judge_failures": 0,
    }))
    lines = [
        json.dumps({"id": str(n), "category": CATEGORY[n], "status": "judged",
                    "values": {"score": v, "wiscore": float(v)}, "verdicts": []})
        for n, v in values.items()
    ]
    lines.append(json.dumps({"id": "77", "category": "culture", "status": "failed", "values": {},
                             "verdicts": []}))
    (folder / "scored-items.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_paired_deltas_intervals_and_changed_items(tmp_path: Path) -> None:
    a, b = _scored_dir(tmp_path / "a", A), _scored_dir(tmp_path / "b", B)
    comparison = compare_runs(a, b, resamples=400, seed=7, top=2)
    rows = {row.name: row for row in comparison.rows}
    # By hand, over the ten items scored in both (901 only in B, 77 failed in both):
    # A: culture 2/4, time 0/2, space 1, biology 0, physics 1, chemistry 0
    #    -> 0.4 * 0.5 + 0.12 * (0 + 1 + 0 + 1 + 0) = 0.44
    # B: culture 3/4, time 1/2, space 1, biology 0, physics 0, chemistry 0
    #    -> 0.4 * 0.75 + 0.12 * (0.5 + 1) = 0.48
    assert rows["overall"].a == pytest.approx(0.44, abs=1e-9)
    assert rows["overall"].b == pytest.approx(0.48, abs=1e-9)
    assert rows["overall"].delta == pytest.approx(0.04, abs=1e-9) and rows["overall"].paired == 10
    assert rows["culture"].delta == pytest.approx(0.25) and rows["culture"].paired == 4
    assert rows["time"].delta == pytest.approx(0.5) and rows["physics"].delta == pytest.approx(-1.0)
    assert rows["space"].delta == 0 and (rows["space"].low, rows["space"].high) == (0, 0)
    for row in rows.values():
        assert row.low <= row.delta + 1e-12 and row.delta - 1e-12 <= row.high
    # Within-category resampling: physics and time hold one and two items, so their deltas
    # never vary in a resample of a single flipped item, or vary between 0 and 1 for time.
    assert (rows["physics"].low, rows["physics"].high) == (-1.0, -1.0)
    assert [change.id for change in comparison.changed] == ["2", "401"]
    assert any("scored 11 items" in note for note in comparison.notes)
    # Seeded: the same seed gives the same intervals, another seed may not.
    again = compare_runs(a, b, resamples=400, seed=7, top=2)
    assert [(r.low, r.high) for r in again.rows] == [(r.low, r.high) for r in comparison.rows]


def test_identical_runs_have_zero_intervals_and_judges_are_named(tmp_path: Path) -> None:
    a = _scored_dir(tmp_path / "a", A)
    b = _scored_dir(tmp_path / "b", A, judge="judge-y")
    comparison = compare_runs(a, b, resamples=50)
    assert all(row.delta == 0 and row.low == 0 and row.high == 0 for row in comparison.rows)
    assert comparison.changed == []
    assert any("different judges" in note for note in comparison.notes)


def test_the_command_prints_a_table_json_and_writes_html(tmp_path: Path) -> None:
    a, b = _scored_dir(tmp_path / "a", A), _scored_dir(tmp_path / "b", B)
    result = invoke("eval", "compare", str(a), str(b), "--resamples", "100")
    assert result.exit_code == 0, result.output
    assert "overall" in result.stdout and "+0.0400" in result.stdout
    page = (b / "compare-a.html").read_text()
    assert "+0.0400" in page and "Content-Security-Policy" in page
    result = invoke("eval", "compare", str(a), str(b), "--json", "--html", str(tmp_path / "c.html"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert data["rows"][0]["name"] == "overall" and (tmp_path / "c.html").is_file()


def test_different_benchmarks_are_refused(tmp_path: Path) -> None:
    a = _scored_dir(tmp_path / "a", A)
    b = _scored_dir(tmp_path / "b", A)
    scores = json.loads((b / "scores.json").read_text())
    (b / "scores.json").write_text(json.dumps({**scores, "benchmark": "ueval"}))
    result = invoke("eval", "compare", str(a), str(b))
    assert result.exit_code == 1 and "same benchmark" in result.output


def test_percentile_interpolates() -> None:
    assert percentile([0.0, 1.0, 2.0, 3.0], 0.5) == 1.5
    assert percentile([5.0], 0.025) == 5.0
    assert percentile([0.0, 10.0], 0.975) == pytest.approx(9.75)
