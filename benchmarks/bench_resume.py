"""Benchmark c: resume latency, from process start to the first new generator call of a killed thread."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO_ROOT, Figure, chain_backends, chain_request

SECTION = "c. Resume latency"
PROFILE = "bench-chain"
REJECTIONS = 2
# Generator sleep per call in the run that gets killed: room to kill it inside a call.
DELAY_S = 0.2
TARGET_S = 1.0
# The test profile's crash-test request (tests/test_crash_resume.py): six steps.
TEST_PROFILE_REQUEST = (
    "A seed falls. Rain comes. A sprout rises. Leaves unfold. A bud forms. It blooms."
)
INTERLEAVE_SCRIPT = Path(sys.executable).with_name("interleave")
CALL_LOG_ENV = "INTERLEAVE_TEST_CALL_LOG"
DELAY_ENV = "INTERLEAVE_TEST_GENERATOR_DELAY"
IMPORTED_LINE = "bench: imports done"
# What any LangGraph program with chat models and a SQLite checkpointer has to import.
FLOOR_IMPORTS = (
    "import langchain_core.language_models, langgraph.graph, langgraph.checkpoint.sqlite.aio, "
    "aiosqlite, pydantic, PIL.Image"
)


def cli_main(argv: list[str]) -> None:
    """The ``interleave`` command with one more profile, ``bench-chain``: the chain planner,
    a critic that rejects twice, and the test generator (which honours the delay and call log)."""
    from interleave_thinker.generators.stand_in import StandInImageGenerator
    from interleave_thinker.models.profiles import register_profile

    register_profile(
        PROFILE,
        lambda _: chain_backends(StandInImageGenerator(), rejections=REJECTIONS),
        note="bench-chain profile: benchmark stand-ins",
    )
    from interleave_thinker import cli

    # Time-stamped by the parent as it arrives: the end of interpreter start and imports.
    print(IMPORTED_LINE, file=sys.stderr, flush=True)
    sys.argv = ["interleave", *argv]
    cli.app()


@dataclass
class Process:
    """A spawned CLI process whose stderr lines are time-stamped as they arrive."""

    popen: subprocess.Popen[str]
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append((time.perf_counter(), line.rstrip("\n")))

    def first_line_starting(self, prefix: str) -> float | None:
        for stamp, line in self.lines:
            if line.startswith(prefix):
                return stamp - self.started
        return None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.reader.join(timeout=5)

    def finish(self, timeout: float) -> int:
        self.popen.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return self.popen.returncode

    def stderr_tail(self) -> str:
        return "\n".join(line for _, line in self.lines[-10:])


def _spawn(command: list[str], run_dir: Path, call_log: Path, delay: float) -> Process:
    env = {
        **os.environ,
        "INTERLEAVE_RUN_DIR": str(run_dir),
        CALL_LOG_ENV: str(call_log),
        DELAY_ENV: str(delay),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "LANGSMITH_TRACING": "false",
    }
    started = time.perf_counter()
    popen = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    return Process(popen, started)


def _bench_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.bench_resume", *args]


def _script_cli(*args: str) -> list[str]:
    return [str(INTERLEAVE_SCRIPT), *args]


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _wait_for_lines(process: Process, path: Path, count: int, timeout: float = 120.0) -> float:
    """Seconds from spawn until the call log holds ``count`` lines."""
    deadline = time.perf_counter() + timeout
    while True:
        if len(_log_lines(path)) >= count:
            return time.perf_counter() - process.started
        if process.popen.poll() is not None:
            process.reader.join(timeout=5)
            raise RuntimeError(
                f"process exited ({process.popen.returncode}) before call {count}:\n"
                + process.stderr_tail()
            )
        if time.perf_counter() > deadline:
            process.kill()
            raise RuntimeError(f"no generator call {count} within {timeout} s")
        time.sleep(0.002)


Cli = Callable[..., list[str]]


def fresh_first_call(cli: Cli, root: Path, run_args: list[str]) -> float:
    """Seconds from spawning ``interleave run`` until its first generator call is logged."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "fresh.log"
    process = _spawn(cli("run", *run_args, "--thread", "fresh"), root / "fresh", log, 0.0)
    try:
        return _wait_for_lines(process, log, 1)
    finally:
        process.kill()


def crash(cli: Cli, root: Path, run_args: list[str], kill_after: int) -> tuple[Path, Path]:
    """A run SIGKILLed inside generator call ``kill_after + 1``: (its run dir, its call log)."""
    root.mkdir(parents=True, exist_ok=True)
    run_dir, log = root / "runs", root / "calls.log"
    process = _spawn(cli("run", *run_args, "--thread", "crash"), run_dir, log, DELAY_S)
    _wait_for_lines(process, log, kill_after)
    # Half a generator delay later the process is inside the next call's sleep.
    time.sleep(DELAY_S / 2)
    process.kill()
    done = len(_log_lines(log))
    if done != kill_after:
        raise RuntimeError(f"expected {kill_after} calls before the kill, found {done}")
    return run_dir, log


@dataclass
class Resumed:
    """Seconds from spawn: imports done, the 'resuming' line, the first new generator call."""

    imported: float
    banner: float
    first_call: float


def resume(cli: Cli, run_dir: Path, log: Path, done: int, total: int) -> Resumed:
    """Resume the killed thread; the resumed process then finishes it, which is checked: every
    call made once, none repeated."""
    process = _spawn(cli("resume", "crash"), run_dir, log, 0.0)
    first_new = _wait_for_lines(process, log, done + 1)
    code = process.finish(timeout=120)
    calls = _log_lines(log)
    repeated = [call for call, count in Counter(calls).items() if count > 1]
    if code != 0 or repeated or len(calls) != total:
        raise RuntimeError(
            f"resume ended with code {code}, {len(calls)} calls (expected {total}), "
            f"repeated: {repeated}\n{process.stderr_tail()}"
        )
    imported = process.first_line_starting(IMPORTED_LINE)
    banner = process.first_line_starting("resuming")
    return Resumed(
        math.nan if imported is None else imported, math.nan if banner is None else banner,
        first_new,
    )


def _wall(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
    return time.perf_counter() - started


def import_breakdown(top: int = 12) -> str:
    """``python -X importtime -c 'import interleave_thinker.cli'``, self time summed by package."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import interleave_thinker.cli"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    by_package: dict[str, int] = {}
    modules: list[tuple[int, str]] = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.split(":", 1)[1].split("|")
        module = name.strip()
        root = module.split(".")[0]
        by_package[root] = by_package.get(root, 0) + int(self_us)
        if module.startswith("interleave_thinker"):
            modules.append((int(cumulative_us), module))
    total = sum(by_package.values())
    rows = sorted(by_package.items(), key=lambda item: -item[1])[:top]
    lines = [
        f"`python -X importtime -c 'import interleave_thinker.cli'`: {total / 1000:.0f} ms of "
        "imports in all; self time by top-level package:",
        "",
        "```",
        *(f"{name:28} {us / 1000:7.1f} ms" for name, us in rows),
        "```",
        "",
        "Project modules by cumulative import time (each includes what it imports first):",
        "",
        "```",
        *(f"{name:42} {us / 1000:7.1f} ms" for us, name in sorted(modules, reverse=True)[:8]),
        "```",
    ]
    return "\n".join(lines)


def run(repeats: int, quick: bool) -> list[Figure]:
    """Each round: interpreter and import timings, a fresh run to its first call, one killed
    run and its resume by the CLI. Quick mode (the smoke test) makes the chain shorter and skips
    the cross-check with the installed console script."""
    steps = 3 if quick else 10
    total = steps * (REJECTIONS + 1)
    kill_after = total // 2
    run_args = [chain_request(steps), "--profile", PROFILE, "--size", "64x64",
                "--max-attempts", str(REJECTIONS + 1)]
    series: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        base = Path(tmp)
        for index in range(repeats):
            root = base / f"round-{index}"
            series["python"].append(_wall("pass"))
            series["import"].append(_wall("import interleave_thinker.cli"))
            series["floor"].append(_wall(FLOOR_IMPORTS))
            series["fresh"].append(fresh_first_call(_bench_cli, root / "fresh", run_args))
            run_dir, log = crash(_bench_cli, root / "crash", run_args, kill_after)
            resumed = resume(_bench_cli, run_dir, log, kill_after, total)
            series["resume"].append(resumed.first_call)
            series["imported"].append(resumed.imported)
            series["banner"].append(resumed.banner)
        if not quick:
            script_total = _test_profile_calls(base / "count")
            script_args = [TEST_PROFILE_REQUEST, "--profile", "test", "--size", "64x64"]
            for index in range(min(repeats, 2)):
                root = base / f"script-{index}"
                series["script fresh"].append(fresh_first_call(_script_cli, root / "fresh", script_args))
                run_dir, log = crash(_script_cli, root / "crash", script_args, script_total // 2)
                resumed = resume(_script_cli, run_dir, log, script_total // 2, script_total)
                series["script resume"].append(resumed.first_call)
    trajectory = (
        f"`interleave run` ({steps} chained steps x {REJECTIONS + 1} attempts = {total} calls, "
        f"test generator sleeping {DELAY_S} s per call) is SIGKILLed inside call "
        f"{kill_after + 1}; `interleave resume` is timed from spawn until the call log gets its "
        "next line, then finishes the thread (checked: every call made once). The resumed "
        "process runs with no generator delay. Baseline: spawn to the first generator call of a "
        "fresh `interleave run` of the same request. The CLI runs as `python -m "
        "benchmarks.bench_resume` (the `interleave` app plus a `bench-chain` profile, since the "
        "test profile's planner stops at six steps)."
    )
    target = f"< {TARGET_S:g} s"
    stage_notes = [
        "Interpreter start and every import, up to the CLI's command function (the benchmark "
        "entry point prints a line there).",
        "CLI options and settings, `_quiet_libraries`, the profile's backends, the checkpointer "
        "opened and the thread's state loaded and checked.",
        "The graph continues from the checkpoint: generator node, ledger lookup, the backend "
        "call itself.",
    ]
    first, imported, banner = series["resume"], series["imported"], series["banner"]
    stages = [
        ("spawn to imports done", imported),
        ("imports done to the 'resuming' line", [b - i for b, i in zip(banner, imported, strict=True)]),
        ("'resuming' line to first new call", [f - b for f, b in zip(first, banner, strict=True)]),
    ]
    figures = [
        Figure(
            SECTION, f"resume to first new generator call ({total}-call thread)",
            "s", first, series["fresh"], target=target,
            check=lambda f: f.median < TARGET_S, notes=trajectory,
        ),
        *(
            Figure(SECTION, f"stage {number}: {name}", "s", samples,
                   notes=stage_notes[number - 1])
            for number, (name, samples) in enumerate(stages, start=1)
        ),
    ]
    figures += [
        Figure(
            SECTION, "import part: `python -c 'import interleave_thinker.cli'`", "s",
            series["import"], series["floor"],
            notes=import_breakdown() + "\n\nBaseline: the third-party floor below. Measured in "
            "separate processes, so its spread is not that of stage 1.",
        ),
        Figure(
            SECTION, "third-party floor: `python -c 'import langchain_core.language_models, "
            "langgraph.graph, langgraph.checkpoint.sqlite.aio, aiosqlite, pydantic, PIL.Image'`",
            "s", series["floor"],
            notes="What any program built on LangGraph, LangChain chat models and the SQLite "
            "checkpointer imports before doing anything.",
        ),
        Figure(SECTION, "interpreter start: `python -c pass`", "s", series["python"]),
    ]
    if series["script resume"]:
        figures.append(
            Figure(
                SECTION, "cross-check: installed `interleave` script, test profile, resume to "
                "first new call", "s", series["script resume"], series["script fresh"],
                target=target, check=lambda f: f.median < TARGET_S,
                notes="The console script as a user runs it, `--profile test`, on the six-step "
                "request of tests/test_crash_resume.py, killed halfway: the same start-up cost "
                "as the benchmark's entry point.",
            )
        )
    return figures


def _test_profile_calls(root: Path) -> int:
    """How many generator calls the test profile makes for the cross-check request."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "calls.log"
    process = _spawn(_script_cli("run", TEST_PROFILE_REQUEST, "--profile", "test", "--size",
                                 "64x64", "--thread", "count"), root, log, 0.0)
    if process.finish(timeout=120) != 0:
        raise RuntimeError("test-profile run failed:\n" + process.stderr_tail())
    return len(_log_lines(log))


if __name__ == "__main__":
    cli_main(sys.argv[1:])
