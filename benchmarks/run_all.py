"""Write REPORT.md: python -m benchmarks.run_all [--quick] [--only X] [--with-section F]"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import Figure, machine_info, render_report

MODULES = (
    "bench_orchestration",
    "bench_sqlite_saver",
    "bench_checkpoints",
    "bench_resume",
    "bench_batching",
    "bench_memory",
    "bench_graph_work",
)
DEFAULT_REPORT = Path(__file__).resolve().with_name("REPORT.md")
TARGETS_NOTE = Path(__file__).resolve().with_name("TARGETS.md")


def _selected(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(MODULES)
    names = []
    for item in only:
        for name in filter(None, (part.strip() for part in item.split(","))):
            module = name if name.startswith("bench_") else f"bench_{name}"
            if module not in MODULES:
                raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(MODULES)}")
            names.append(module)
    return names


def run_benchmarks(
    names: Sequence[str], *, repeats: int, quick: bool
) -> tuple[list[Figure], list[str]]:
    """Run each named module's ``run``; returns the figures and one line per module on what ran."""
    figures: list[Figure] = []
    log: list[str] = []
    for name in names:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"benchmarks.{name}":
                raise
            log.append(f"{name}: skipped, benchmarks/{name}.py does not exist")
            print(log[-1], file=sys.stderr)
            continue
        print(f"{name}: running (repeats={repeats}, quick={quick})", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            produced = module.run(repeats=repeats, quick=quick)
        except Exception:
            log.append(f"{name}: FAILED after {time.perf_counter() - started:.1f} s: "
                       + traceback.format_exc().strip().splitlines()[-1])
            traceback.print_exc()
            continue
        seconds = time.perf_counter() - started
        figures.extend(produced)
        log.append(f"{name}: {len(produced)} figures in {seconds:.1f} s")
        print(log[-1], file=sys.stderr, flush=True)
    return figures, log


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument(
        "--only", action="append", metavar="NAME",
        help="run only this benchmark (e.g. orchestration or bench_resume); repeat or use commas",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_REPORT, help="report path")
    parser.add_argument(
        "--with-section", action="append", type=Path, default=[], metavar="FILE",
        help="append a Markdown section another environment wrote (the vLLM benchmark's --section)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    info = machine_info()
    started = time.perf_counter()
    figures, log = run_benchmarks(_selected(args.only), repeats=args.repeats, quick=args.quick)
    info["command"] = "`python -m benchmarks.run_all " + " ".join(
        argv if argv is not None else sys.argv[1:]
    ).replace(str(args.output), args.output.name) + "`"
    info["benchmarks"] = [*log, f"total {time.perf_counter() - started:.0f} s"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = render_report(figures, info)
    for section in args.with_section:
        # Measured in its own environment (vLLM pins another torch), on the same machine.
        report += "\n" + section.read_text(encoding="utf-8")
    if not args.quick and TARGETS_NOTE.is_file():
        # What the numbers cannot say: why a target that fails is the wrong target.
        report += "\n" + TARGETS_NOTE.read_text(encoding="utf-8")
    args.output.write_text(report, encoding="utf-8")
    print(f"report written to {args.output}", file=sys.stderr)
    return 1 if any(line.split(": ", 1)[1].startswith("FAILED") for line in log) else 0


if __name__ == "__main__":
    raise SystemExit(main())
