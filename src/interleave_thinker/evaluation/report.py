"""HTML pages of a scored run and of a comparison; every piece of model or benchmark text is escaped."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from interleave_thinker.render.safe_text import display_text

if TYPE_CHECKING:
    from interleave_thinker.evaluation.base import BenchItem, Benchmark, ItemOutput, ItemResult
    from interleave_thinker.evaluation.compare import Comparison

THUMB_PIXELS = 192
RAW_REPLY_CHARS = 1500
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
td, th { padding: .2rem .6rem; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
section.item { border-top: 2px solid #ccc; padding: .8rem 0; }
.status-failed { color: #b00020; } .status-missing { color: #a15c00; } .status-judged { color: #1b6e20; }
.answer { white-space: pre-wrap; background: #f7f7f7; padding: .5rem; border-radius: .3rem; }
.images img { margin: .2rem; border: 1px solid #ddd; }
details pre { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; }
.note { color: #666; font-style: italic; }
"""


def _e(value: object) -> str:
    return escape(display_text(str(value)), quote=True)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )


def _thumb(path: Path) -> str:
    try:
        with Image.open(path) as image:
            small = image.convert("RGB")
            small.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=80)
    except OSError:
        return f'<span class="note">unreadable image {_e(path.name)}</span>'
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img src="data:image/jpeg;base64,{encoded}" alt="{_e(path.name)}" '
            f'width="{small.width}" height="{small.height}" title="{_e(path.name)}">')


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(scores: dict[str, Any]) -> str:
    rows = [
        ["overall", f'<span class="num">{_number(scores.get("overall"))}</span>'],
        *[[_e(name), f'<span class="num">{_number(value)}</span>']
          for name, value in (scores.get("categories") or {}).items()],
    ]
    counts = (
        f"{scores['items']} items: {scores['judged']} judged, {scores.get('missing', 0)} without output "
        f"(scored as the minimum), {len(scores.get('failed_items', []))} left out after "
        f"{scores['judge_failures']} failed judge call(s); the metric is over "
        f"{scores.get('scored', scores['judged'])} items."
    )
    details = json.dumps(scores.get("details", {}), indent=2, ensure_ascii=False)
    return (
        f"<p>{_e(scores['metric'])}</p><p>judge: <code>{_e(scores['judge'])}</code></p>"
        f"<p>{_e(counts)}</p>{_table(rows, ['', 'score'])}"
        f"<details><summary>details</summary><pre>{_e(details)}</pre></details>"
    )


def score_page(bench: Benchmark, scores: dict[str, Any],
               judged: Sequence[tuple[BenchItem, ItemOutput | None, ItemResult]], out: Path) -> str:
    """The scored run: the summary, then each item's request, answer, images, verdicts and scores."""
    sections = []
    for item, output, result in judged:
        parts = [
            f'<section class="item" id="{_e(item.id)}"><h3>{_e(item.id)} '
            f'<small>{_e(item.category)}</small> '
            f'<span class="status-{_e(result.status)}">{_e(result.status)}</span></h3>',
            f"<p><strong>request</strong>: {_e(item.text)}</p>",
        ]
        if result.note:
            parts.append(f'<p class="note">{_e(result.note)}</p>')
        if output is None:
            parts.append('<p class="note">no output</p>')
        else:
            if output.text:
                parts.append(f'<div class="answer">{_e(output.text)}</div>')
            if output.images:
                thumbs = "".join(_thumb(path) for path in output.images)
                parts.append(f'<div class="images">{thumbs}</div>')
        if result.values:
            rows = [[_e(key), f'<span class="num">{_number(value)}</span>']
                    for key, value in result.values.items()]
            parts.append(_table(rows, ["value", ""]))
        if result.verdicts:
            rows = []
            for verdict in result.verdicts:
                shown = (_number(verdict.value) if verdict.ok
                         else f"<strong>failed</strong>: {_e(verdict.error)}")
                raw = verdict.raw[-RAW_REPLY_CHARS:]
                rows.append([
                    _e(bench.describe_criterion(item, verdict.criterion)),
                    shown + (" (cached)" if verdict.cached else ""),
                    f"<details><summary>reply</summary><pre>{_e(raw)}</pre></details>" if raw else "",
                ])
            parts.append(_table(rows, ["criterion", "verdict", ""]))
        parts.append("</section>")
        sections.append("".join(parts))
    title = f"{bench.title} scores: {os.path.basename(os.path.abspath(out))}"
    body = f"<h1>{_e(title)}</h1>{_summary(scores)}<h2>Items</h2>{''.join(sections)}"
    return _page(title, body)


def compare_page(comparison: Comparison) -> str:
    """Two scored runs side by side: overall and categories with their deltas and intervals."""
    def interval(low: float | None, high: float | None) -> str:
        return "–" if low is None or high is None else f"[{low:+.4f}, {high:+.4f}]"

    rows = []
    for row in comparison.rows:
        rows.append([
            _e(row.name), f'<span class="num">{_number(row.a)}</span>',
            f'<span class="num">{_number(row.b)}</span>',
            f'<span class="num">{"–" if row.delta is None else f"{row.delta:+.4f}"}</span>',
            f'<span class="num">{interval(row.low, row.high)}</span>', str(row.paired),
        ])
    changed = [
        [_e(change.id), _e(change.category), f'<span class="num">{_number(change.a)}</span>',
         f'<span class="num">{_number(change.b)}</span>',
         f'<span class="num">{change.delta:+.4f}</span>']
        for change in comparison.changed
    ]
    notes = "".join(f'<p class="note">{_e(note)}</p>' for note in comparison.notes)
    title = f"{comparison.benchmark}: {comparison.name_b} vs {comparison.name_a}"
    body = (
        f"<h1>{_e(title)}</h1><p>A: <code>{_e(comparison.dir_a)}</code> (judge "
        f"<code>{_e(comparison.judge_a)}</code>)<br>B: <code>{_e(comparison.dir_b)}</code> (judge "
        f"<code>{_e(comparison.judge_b)}</code>)</p>{notes}"
        f"<p>{_e(comparison.method)}</p>"
        + _table(rows, ["", "A", "B", "B - A (paired)", "95% CI", "items"])
        + "<h2>Items that changed most</h2>"
        + _table(changed, ["item", "category", "A", "B", "B - A"])
    )
    return _page(title, body)
