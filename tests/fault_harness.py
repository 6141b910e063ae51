"""Fault-injection harness: runs `interleave` in subprocesses, SIGKILLs them, resumes, and checks.

What is killed where (summarised in RELIABILITY.md):

- Random kills by time: the real ``interleave`` console script is killed after an offset drawn
  from a seeded RNG, scaled to a measured clean run: some during start-up (imports, opening the
  checkpointer), most inside the trajectory (planning, generator calls, the critic, checkpoint
  writes, composing, the HTML write), scaled to the work the thread has left.
- Random kills by event: ``tests/fault_entry.py`` runs the same CLI with one failpoint armed,
  a point and a count N drawn from the RNG among the points a clean run reaches (see its
  docstring): node entry and exit, after the generator returned, inside a checkpoint write
  before COMMIT (SQLite) or before the pipeline's Sync (PostgreSQL), after the commit, between
  the PostgreSQL blob and checkpoint statements, during SQLite's COMMIT (timer), and half-way
  through, after the fsync of, and after the rename of an image, ledger record or HTML file.
- A thread is killed again and again (run, resume, resume, ...) until a process finishes.

After every kill the thread's checkpoint and run directory are read, and after the final
process: the exported document equals an uninterrupted run's; no step accepted before a kill
was lost or changed; no generator call that had finished (its image stored and recorded in the
ledger) was drawn again; the call log has no more lines than the clean run plus the images in
flight at each kill; no ``.tmp-`` file is left under the run directory; every stored image
matches its hash; ``show --json`` and ``export`` to html, md and json work.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from interleave_thinker.cli import app
from interleave_thinker.errors import ImageError, UnknownThreadError
from interleave_thinker.inspect import athread_report
from interleave_thinker.storage.atomic import TEMP_PREFIX
from interleave_thinker.storage.image_store import ImageStore

REQUEST = "A seed falls. Rain comes. A sprout rises. Leaves unfold. A bud forms. It blooms."
SIZE = "64x64"
# Seconds per generator backend call: long enough that kills land inside calls, short enough
# that 50 kills fit in about a minute and a half per backend.
GENERATOR_DELAY = "0.05"
SEED_ENV = "INTERLEAVE_FAULT_SEED"
DEFAULT_SEED = 20250611
# How long any single process may take before the harness calls it hung (a loaded CI box).
PROCESS_TIMEOUT_S = 180.0
POLL_S = 0.01

INTERLEAVE = Path(sys.executable).with_name("interleave")
ENTRY = Path(__file__).with_name("fault_entry.py")
TIMING_FIELDS = ("started_at", "generation_seconds", "critique_seconds", "reused")
FINISHED = ("accepted", "forced", "text", "skipped")

Job = tuple[int, int]  # (step, attempt)


def fault_seed() -> int:
    """The suite's seed: INTERLEAVE_FAULT_SEED, or a fixed default so runs are repeatable."""
    return int(os.environ.get(SEED_ENV) or DEFAULT_SEED)


def replay_hint(seed: int) -> str:
    return f"[fault seed {seed}: rerun with {SEED_ENV}={seed}]"


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Add the seed to any assertion that fails inside, so the failure can be replayed."""
    try:
        yield
    except AssertionError as exc:
        if replay_hint(seed) in str(exc):
            raise
        raise AssertionError(f"{exc} {replay_hint(seed)}").with_traceback(exc.__traceback__) from None


# -- processes -------------------------------------------------------------------------------


class Process:
    """A subprocess of the CLI with stdout and stderr in files (pipes could fill and block)."""

    def __init__(self, argv: list[str], env: dict[str, str], logs: Path, label: str) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / f"{label}.out", logs / f"{label}.err"
        self.label = label
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.started = time.monotonic()
            self.popen = subprocess.Popen(argv, env=env, stdout=out, stderr=err)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = PROCESS_TIMEOUT_S) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"{self.label} did not finish in {timeout}s; stderr:\n{self.stderr()[-3000:]}"
            ) from None

    def kill_at(self, offset: float) -> bool:
        """SIGKILL the process ``offset`` seconds after it started; False if it exited first."""
        deadline = self.started + offset
        while self.popen.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait()
                # It may have exited on its own in the same instant; then it was not killed.
                return self.popen.returncode == -signal.SIGKILL
            time.sleep(min(POLL_S, left))
        return False

    def wait_for(self, text: str = "", timeout: float = PROCESS_TIMEOUT_S) -> float | None:
        """Seconds from start until ``text`` (by default any progress line: start-up is over)
        appeared on stderr, polled; None if the process exited without printing it."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.popen.poll() is not None
            printed = self.stderr()
            if (text in printed) if text else printed:
                return self.elapsed()
            if exited:
                return None
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.label} printed no {text!r} in {timeout}s")
            time.sleep(POLL_S)


def phase_at_kill(stderr: str) -> str:
    """Roughly where a killed process was, from the last progress line it printed."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "start-up"
    last = lines[-1]
    if last.startswith(("thread ", "resuming ")):
        return "first node (planning, or the node a resume re-runs)"
    if last.startswith("planned ") or last.startswith("  "):
        return "after planning (checkpoint, routing)"
    if last.endswith(": drawing") or "reused" in last:
        return "generator call, image store, ledger, critic call"
    if "critic" in last or "rejected" in last or "forced" in last:
        return "after a verdict (critic checkpoint, next pass)"
    if last.startswith("document composed"):
        return "composing, HTML write"
    if last.startswith(("note:", "done:")):
        return "exit, after the HTML write"
    return f"other: {last[:60]}"


# -- one thread, killed and resumed ----------------------------------------------------------


@dataclass
class Snapshot:
    """What a thread's checkpoint and run directory hold at one moment."""

    exists: bool
    status: str
    attempts: dict[int, list[tuple[Any, ...]]]
    finished: dict[int, tuple[str, str | None]]
    recorded: set[str]
    log_lines: int
    leftovers: list[Path]


@dataclass
class Kill:
    how: str
    phase: str
    log_start: int
    snapshot: Snapshot


@dataclass
class Thread:
    """A thread in its own run directory, with its own generator call log."""

    root: Path
    thread: str
    checkpointer: str | None
    profile: str = "test"
    request: str = REQUEST
    extra_env: dict[str, str] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    processes: int = 0

    @property
    def run_dir(self) -> Path:
        return self.root / "runs"

    @property
    def call_log(self) -> Path:
        return self.root / "calls.log"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        # Stray settings of the caller's shell must not arm a failpoint or redirect the run.
        inherited = {
            name: value for name, value in os.environ.items()
            if not name.startswith("INTERLEAVE_FAILPOINT") and name != "INTERLEAVE_CHECKPOINTER"
        }
        env = {
            **inherited,
            "INTERLEAVE_RUN_DIR": str(self.run_dir),
            "INTERLEAVE_TEST_CALL_LOG": str(self.call_log),
            "INTERLEAVE_TEST_GENERATOR_DELAY": GENERATOR_DELAY,
            **self.extra_env,
            **extra,
        }
        if self.checkpointer:
            env["INTERLEAVE_CHECKPOINTER"] = self.checkpointer
        return env

    def command(self, started: bool) -> list[str]:
        """`run` for a thread with no checkpoint yet, `resume` once it has one."""
        if started:
            return ["resume", self.thread]
        return ["run", "--profile", self.profile, "--size", SIZE, "--thread", self.thread, self.request]

    def start(self, args: list[str], *, failpoint: str | None = None, **extra_env: str) -> Process:
        """The console script, or the failpoint entry script when a failpoint is armed."""
        self.processes += 1
        label = f"p{self.processes:02d}"
        if failpoint is None:
            argv = [str(INTERLEAVE), *args]
            env = self.env(**extra_env)
        else:
            argv = [sys.executable, str(ENTRY), *args]
            env = self.env(
                INTERLEAVE_FAILPOINT=failpoint,
                INTERLEAVE_FAILPOINT_FIRED=str(self.root / "fired.jsonl"),
                **extra_env,
            )
        return Process(argv, env, self.logs, label)

    def fired(self) -> list[dict[str, Any]]:
        path = self.root / "fired.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def calls(self) -> list[Job]:
        if not self.call_log.exists():
            return []
        lines = [json.loads(line) for line in self.call_log.read_text().splitlines()]
        assert all(line["thread"] == self.thread for line in lines), self.call_log
        return [(line["step"], line["attempt"]) for line in lines]

    def snapshot(self) -> Snapshot:
        """Read the checkpoint (in this process, as `interleave show --json` would) and the files."""
        try:
            report = asyncio.run(
                athread_report(self.thread, run_dir=self.run_dir, checkpointer=self.checkpointer)
            )
        except UnknownThreadError:
            report = None
        attempts: dict[int, list[tuple[Any, ...]]] = {}
        finished: dict[int, tuple[str, str | None]] = {}
        for step in report["steps"] if report else ():
            attempts[step["number"]] = [
                (a["number"], a["prompt"], a["seed"], a["image"]["sha256"], a["critique"])
                for a in step["attempts"]
            ]
            if step["status"] in FINISHED:
                finished[step["number"]] = (step["status"], step["image"])
        return Snapshot(
            exists=report is not None,
            status=report["status"] if report else "none",
            attempts=attempts,
            finished=finished,
            recorded=ledger_images(self.run_dir),
            log_lines=len(self.calls()),
            leftovers=temp_files(self.run_dir),
        )


def ledger_images(run_dir: Path) -> set[str]:
    """The image hash of every record in the generation ledger (finished generator calls)."""
    folder = run_dir / "generations"
    if not folder.exists():
        return set()
    images = set()
    for path in folder.glob("??/*.json"):
        try:
            record = json.loads(path.read_bytes())
        except ValueError as exc:
            raise AssertionError(f"ledger record {path} is not whole: a partial write") from exc
        # Records name the thread and the image; older ones hold the image reference alone.
        images.add(record["image"]["sha256"] if "image" in record else record["sha256"])
    return images


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob(f"{TEMP_PREFIX}*")) if run_dir.exists() else []


# -- the uninterrupted reference -------------------------------------------------------------


@dataclass
class Reference:
    """An uninterrupted run: its document, each attempt's image and how long it took."""

    document: dict[str, Any]
    image_of: dict[Job, str]
    attempts: dict[int, list[tuple[Any, ...]]]
    calls: list[Job]
    # Seconds from the start of the clean process until start-up was over (its first progress
    # line), the plan was made, and the document was written ("done:"; the exit follows).
    startup_seconds: float
    planned_seconds: float
    done_seconds: float

    @property
    def job_of(self) -> dict[str, Job]:
        return {sha: job for job, sha in self.image_of.items()}


def comparable(document: dict[str, Any]) -> dict[str, Any]:
    """The exported document without the per-run timing fields of its attempts."""
    document = json.loads(json.dumps(document))
    for step in document["steps"]:
        for attempt in step["attempts"]:
            for name in TIMING_FIELDS:
                attempt.pop(name)
    return document


def cli(*args: str) -> str:
    """The real typer app, in this process (no start-up cost); returns stdout."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"interleave {' '.join(args)} failed:\n{result.output}"
    return result.stdout


def export_json(thread: Thread) -> dict[str, Any]:
    out = thread.root / "export.json"
    cli("export", thread.thread, "--format", "json", "-o", str(out), *location(thread))
    payload = json.loads(out.read_text())
    assert payload["thread_id"] == thread.thread
    return payload["document"]


def location(thread: Thread) -> list[str]:
    args = ["--run-dir", str(thread.run_dir)]
    return [*args, "--checkpointer", thread.checkpointer] if thread.checkpointer else args


def clean_reference(thread: Thread) -> Reference:
    """Run ``thread`` to its end without a kill and keep what a killed run must reproduce."""
    process = thread.start(thread.command(started=False))
    startup = process.wait_for()
    planned = process.wait_for("planned ")
    done = process.wait_for("done: ")
    code = process.wait()
    assert startup is not None and planned is not None and done is not None, process.stderr()
    assert code == 0, process.stderr()
    document = export_json(thread)
    image_of: dict[Job, str] = {}
    attempts: dict[int, list[tuple[Any, ...]]] = {}
    for step in document["steps"]:
        attempts[step["number"]] = [
            (a["number"], a["prompt"], a["seed"], a["image"]["sha256"], a["critique"])
            for a in step["attempts"]
        ]
        for attempt in step["attempts"]:
            image_of[(step["number"], attempt["number"])] = attempt["image"]["sha256"]
    calls = thread.calls()
    if thread.profile == "test":  # only the test generator keeps a call log
        assert len(calls) == len(set(calls)) == len(image_of), (calls, image_of)
    return Reference(comparable(document), image_of, attempts, calls, startup, planned, done)


# -- checks ----------------------------------------------------------------------------------


def check_progress(before: Snapshot, after: Snapshot, reference: Reference, where: str) -> None:
    """Nothing committed before a kill is lost or changed after it; everything matches the
    uninterrupted run."""
    if before.exists:
        assert after.exists, f"{where}: the thread's checkpoint disappeared"
    for number, (status, image) in before.finished.items():
        assert after.finished.get(number) == (status, image), (
            f"{where}: step {number} was {status} with image {image} before the kill, "
            f"now {after.finished.get(number)}"
        )
    for number, attempts in before.attempts.items():
        now = after.attempts.get(number, [])
        assert len(now) >= len(attempts), f"{where}: step {number} lost attempts: {attempts} -> {now}"
        for old, new in zip(attempts, now, strict=False):
            # A critique may be added to an attempt later, never changed or dropped.
            assert old[:4] == new[:4] and old[4] in (None, new[4]), (
                f"{where}: step {number} attempt changed: {old} -> {new}"
            )
    for number, attempts in after.attempts.items():
        expected = reference.attempts[number]
        for got in attempts:
            assert got[0] <= len(expected), (
                f"{where}: step {number} has attempt {got[0]}; the uninterrupted run made "
                f"{len(expected)}"
            )
            want = expected[got[0] - 1]
            assert got[:4] == want[:4] and got[4] in (None, want[4]), (
                f"{where}: step {number} attempt {got[0]} differs from the uninterrupted run: "
                f"{got} != {want}"
            )
    unknown = after.recorded - set(reference.image_of.values())
    assert not unknown, f"{where}: the ledger records images no clean run drew: {unknown}"


def check_store(run_dir: Path, where: str) -> int:
    """Every image file matches its hash (a partial file would not); returns how many."""
    store = ImageStore(run_dir / "images")
    files = [p for p in store.root.glob("??/*") if p.is_file()]
    try:
        for path in files:
            # find() reads through the store's own verified read and decodes the image.
            store.find(path.name.split(".")[0])
        for sha in ledger_images(run_dir):
            store.find(sha)
    except ImageError as exc:
        raise AssertionError(f"{where}: {exc.message}") from exc
    return len(files)


def check_calls(thread: Thread, reference: Reference, final_document: dict[str, Any],
                where: str) -> dict[str, int]:
    """No finished generator call was drawn again, and repeats are bounded by in-flight images.

    A call is *finished* once its image is stored and recorded in the ledger. The test
    generator logs a line when it draws, before the image is stored, so a kill between the
    two leaves a drawn but unfinished call, which a resume may draw again.
    """
    calls = thread.calls()
    job_of = reference.job_of
    in_flight: Counter[Job] = Counter()
    for number, kill in enumerate(thread.kills, 1):
        finished = {job_of[sha] for sha in kill.snapshot.recorded}
        again = [job for job in calls[kill.snapshot.log_lines:] if job in finished]
        assert not again, (
            f"{where}: kill {number} ({kill.how}): calls finished before it were drawn again "
            f"after it: {again}"
        )
        drawn = calls[kill.log_start:kill.snapshot.log_lines]
        in_flight.update(set(drawn) - finished)
        # A call finished but not yet in the checkpoint must come back from the ledger.
        checkpointed = {
            (step, attempt[0]) for step, attempts in kill.snapshot.attempts.items()
            for attempt in attempts
        }
        for step, attempt in sorted(finished - checkpointed):
            assert final_attempt(final_document, step, attempt)["reused"], (
                f"{where}: kill {number} ({kill.how}): step {step} attempt {attempt} was "
                "recorded in the ledger but the resume did not reuse it"
            )
    counts = Counter(calls)
    assert set(counts) == set(reference.calls), (
        f"{where}: drawn jobs {sorted(counts)} != uninterrupted run's {sorted(reference.calls)}"
    )
    for job, count in counts.items():
        assert count <= 1 + in_flight[job], (
            f"{where}: step {job[0]} attempt {job[1]} drawn {count} times, but it was in flight "
            f"at only {in_flight[job]} kills"
        )
    assert len(calls) <= len(reference.calls) + sum(in_flight.values())
    return {"calls": len(calls), "in_flight": sum(in_flight.values())}


def final_attempt(document: dict[str, Any], step: int, attempt: int) -> dict[str, Any]:
    for item in document["steps"]:
        if item["number"] == step:
            return item["attempts"][attempt - 1]
    raise AssertionError(f"no step {step} in the document")


def check_finished(thread: Thread, reference: Reference, where: str) -> dict[str, int]:
    """Everything that must hold once a killed thread has been resumed to its end."""
    document = export_json(thread)
    assert comparable(document) == reference.document, (
        f"{where}: the resumed document differs from the uninterrupted run's"
    )
    report = json.loads(cli("show", thread.thread, "--json", *location(thread)))
    assert report["status"] == "done" and report["errors"] == [], f"{where}: {report['status']}"
    assert report["document_path"] and Path(report["document_path"]).is_file(), where
    html = thread.root / "export.html"
    cli("export", thread.thread, "--format", "html", "-o", str(html), *location(thread))
    assert "<html" in html.read_text().lower(), where
    md = thread.root / "export.md"
    cli("export", thread.thread, "--format", "md", "-o", str(md), *location(thread))
    assert md.read_text().strip() and any((thread.root / "export_files").iterdir()), where
    leftovers = temp_files(thread.run_dir)
    assert not leftovers, f"{where}: temp files of killed writes were left behind: {leftovers}"
    images = check_store(thread.run_dir, where)
    final = thread.snapshot()
    if thread.kills:
        check_progress(thread.kills[-1].snapshot, final, reference, where)
    stats = check_calls(thread, reference, document, where)
    return {**stats, "images": images}


# -- the random kill loop --------------------------------------------------------------------


@dataclass
class KillStats:
    kills: int = 0
    threads: int = 0
    by_phase: Counter[str] = field(default_factory=Counter)
    leftovers_after_kill: int = 0
    redrawn: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        phases = ", ".join(f"{phase}: {count}" for phase, count in self.by_phase.most_common())
        return (
            f"{self.kills} kills over {self.threads} threads in {self.seconds:.0f}s; "
            f"{self.leftovers_after_kill} kills left a temp file; {self.redrawn} in-flight images "
            f"drawn again; where: {phases}"
        )


def census(thread: Thread) -> dict[str, int]:
    """How often a clean run reaches each failpoint (nothing is killed)."""
    counts = thread.root / "counts.json"
    process = thread.start(
        thread.command(started=False), failpoint="", INTERLEAVE_FAILPOINT_COUNTS=str(counts)
    )
    assert process.wait() == 0, process.stderr()
    return json.loads(counts.read_text())


def kill_randomly(
    make_thread: Callable[[], Thread],
    reference: Reference,
    points: dict[str, int],
    rng: random.Random,
    *,
    target: int,
    seed: int,
    deadline_s: float = 900.0,
) -> KillStats:
    """Kill threads at random points, each again and again until a process finishes, until
    ``target`` kills were made; check every thread after each kill and at its end."""
    stats = KillStats()
    started = time.monotonic()
    work = max(reference.done_seconds - reference.startup_seconds, 0.2)
    while stats.kills < target:
        assert time.monotonic() - started < deadline_s, (
            f"only {stats.kills} kills in {deadline_s}s {replay_hint(seed)}"
        )
        thread: Thread = make_thread()
        stats.threads += 1
        most = rng.randint(3, 10)
        previous = thread.snapshot()
        while True:
            where = f"thread {thread.thread}, process {thread.processes + 1} {replay_hint(seed)}"
            args = thread.command(started=previous.exists)
            log_start = previous.log_lines
            # A thread whose document is in its checkpoint has no work left to kill: its resume
            # only writes the HTML page again (a failpoint kill in a first run covers that).
            if len(thread.kills) >= most or previous.status == "done":
                process = thread.start(args)
                assert process.wait() == 0, f"{where}: {process.stderr()[-3000:]}"
                break
            if rng.random() < 0.6:
                # By time: now and then during start-up, else after start-up (its first progress
                # line, so a slow machine does not turn every kill into a start-up kill) within
                # the work the thread has left.
                in_startup = rng.random() < 0.2
                # Composing and writing the document count as one more unit of work.
                total = len(reference.image_of) + 1
                left = (total - len(previous.recorded)) / total
                offset = rng.uniform(0, reference.startup_seconds if in_startup else work * left)
                process = thread.start(args)
                ready = 0.0 if in_startup else process.wait_for()
                killed = ready is not None and process.kill_at(ready + offset)
                how = f"time {offset:.2f}s after {'start' if in_startup else 'start-up'}"
                phase = phase_at_kill(process.stderr()) if killed else ""
            else:
                point = rng.choice(sorted(points))
                hit = rng.randint(1, points[point])
                delay = f"{rng.uniform(0, 0.002):.6f}"
                process = thread.start(args, failpoint=f"{point}:{hit}",
                                       INTERLEAVE_FAILPOINT_DELAY=delay)
                code = process.wait()
                killed = code == -signal.SIGKILL
                how, phase = f"failpoint {point}:{hit}", f"failpoint {point}"
                if killed:
                    fired = thread.fired()
                    assert fired and fired[-1]["point"] == point and fired[-1]["pid"] == process.popen.pid, (
                        f"{where}: killed, but not at {point}:{hit}: {fired}"
                    )
            if not killed:
                assert process.wait() == 0, f"{where} ({how}): {process.stderr()[-3000:]}"
                break
            snapshot = thread.snapshot()
            check_progress(previous, snapshot, reference, f"{where}, after a kill at {how}")
            check_store(thread.run_dir, f"{where}, after a kill at {how}")
            thread.kills.append(Kill(how, phase, log_start, snapshot))
            stats.kills += 1
            stats.by_phase[phase] += 1
            stats.leftovers_after_kill += bool(snapshot.leftovers)
            previous = snapshot
        result = check_finished(thread, reference, f"thread {thread.thread} {replay_hint(seed)}")
        stats.redrawn += result["calls"] - len(reference.calls)
    stats.seconds = time.monotonic() - started
    return stats
