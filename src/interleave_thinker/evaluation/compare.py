"""Compare two scored runs of one benchmark: paired deltas with seeded bootstrap intervals over items."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.evaluation.base import Benchmark, ItemResult
from interleave_thinker.evaluation.benchmarks import get_benchmark
from interleave_thinker.evaluation.scoring import read_scores


@dataclass
class Row:
    name: str
    a: float | None
    b: float | None
    delta: float | None
    low: float | None
    high: float | None
    paired: int


@dataclass
class Change:
    id: str
    category: str
    a: float
    b: float
    delta: float


@dataclass
class Comparison:
    benchmark: str
    dir_a: str
    dir_b: str
    name_a: str
    name_b: str
    judge_a: str
    judge_b: str
    rows: list[Row]
    changed: list[Change]
    method: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0-1) of sorted values, interpolated linearly between neighbours."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _figures(bench: Benchmark, results: Sequence[ItemResult]) -> dict[str, float | None]:
    summary = bench.aggregate(results)
    return {"overall": summary.overall, **summary.categories}


def compare_runs(
    dir_a: str | os.PathLike[str],
    dir_b: str | os.PathLike[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    top: int = 10,
    confidence: float = 0.95,
) -> Comparison:
    """B against A on the items scored in both: each figure, B - A, and a percentile bootstrap
    interval of B - A from ``resamples`` resamples of the items (within each category, so the
    benchmark's category weights keep their meaning), seeded by ``seed``."""
    if resamples < 1:
        raise ConfigurationError("--resamples must be at least 1")
    if not 0 < confidence < 1:
        raise ConfigurationError("--confidence must be between 0 and 1")
    path_a, path_b = Path(dir_a), Path(dir_b)
    scores_a, results_a = read_scores(path_a)
    scores_b, results_b = read_scores(path_b)
    if scores_a.get("benchmark") != scores_b.get("benchmark"):
        raise ConfigurationError(
            f"{path_a} holds {scores_a.get('benchmark')} scores and {path_b} {scores_b.get('benchmark')}",
            hint="compare two runs of the same benchmark",
        )
    bench = get_benchmark(str(scores_a["benchmark"]))
    notes: list[str] = []
    if scores_a.get("judge") != scores_b.get("judge"):
        notes.append("the runs were scored by different judges: the deltas mix the judge with the model")
    a_by_id = {result.id: result for result in results_a if result.scored}
    b_by_id = {result.id: result for result in results_b if result.scored}
    paired = sorted(set(a_by_id) & set(b_by_id))
    if not paired:
        raise ConfigurationError(f"{path_a} and {path_b} have no scored item in common")
    for label, scores, by_id in (("A", scores_a, a_by_id), ("B", scores_b, b_by_id)):
        if len(by_id) != len(paired):
            notes.append(
                f"{label} scored {len(by_id)} items, {len(paired)} of them also in the other run; "
                f"the figures below are over those {len(paired)} (its own overall: {scores.get('overall')})"
            )
    pairs_a = [a_by_id[item] for item in paired]
    pairs_b = [b_by_id[item] for item in paired]
    figures_a, figures_b = _figures(bench, pairs_a), _figures(bench, pairs_b)

    strata: dict[str, list[int]] = defaultdict(list)
    for index, result in enumerate(pairs_a):
        strata[result.category].append(index)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(resamples):
        chosen = [rng.choice(members) for members in strata.values() for _ in members]
        sample_a = _figures(bench, [pairs_a[i] for i in chosen])
        sample_b = _figures(bench, [pairs_b[i] for i in chosen])
        for name, value in sample_b.items():
            if value is not None and sample_a.get(name) is not None:
                samples[name].append(value - sample_a[name])  # type: ignore[operator]

    counts: dict[str, int] = defaultdict(int)
    for result in pairs_a:
        counts[result.category] += 1
    tail = (1 - confidence) / 2
    rows = []
    for name in dict.fromkeys([*figures_a, *figures_b]):
        a, b = figures_a.get(name), figures_b.get(name)
        values = sorted(samples.get(name, []))
        low = percentile(values, tail) if values else None
        high = percentile(values, 1 - tail) if values else None
        delta = None if a is None or b is None else b - a
        items = len(paired) if name == "overall" else counts.get(name, 0)
        rows.append(Row(name, a, b, delta, low, high, items))

    changes = []
    for item in paired:
        value_a, value_b = bench.headline(a_by_id[item]), bench.headline(b_by_id[item])
        if value_a is not None and value_b is not None and value_a != value_b:
            changes.append(Change(item, a_by_id[item].category, value_a, value_b, value_b - value_a))
    changes.sort(key=lambda change: (-abs(change.delta), change.id))
    method = (
        f"Paired over {len(paired)} items scored in both runs; {int(confidence * 100)}% percentile "
        f"bootstrap of B - A from {resamples} resamples of the items within each category "
        f"(seed {seed})."
    )
    return Comparison(
        benchmark=bench.name, dir_a=str(path_a), dir_b=str(path_b),
        name_a=path_a.resolve().name, name_b=path_b.resolve().name,
        judge_a=str(scores_a.get("judge")), judge_b=str(scores_b.get("judge")),
        rows=rows, changed=changes[:top], method=method, notes=notes,
    )
