"""Storage faults are one line that says what to do, and nothing is lost.

Real failures wherever they can be had without privileges: SQLite's own "database or disk is
full" (a page limit), "database is locked" (another connection's exclusive lock), "database
disk image is malformed" (overwritten pages), bytes flipped inside a stored record, a real
full file system (a small tmpfs, when this machine lets the test mount one), PostgreSQL
sessions ended by the server (pg_terminate_backend: AdminShutdown) and a pool with no free
connection (PoolTimeout). The lowest layer is patched only for a disk I/O error and for a
full disk under the HTML page.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from typer.testing import CliRunner

from conftest import RecordingGenerator
from interleave_thinker.batch import arun_batch, thread_id_for
from interleave_thinker.checkpoints import savers
from interleave_thinker.checkpoints.faults import storage_error
from interleave_thinker.cli import app
from interleave_thinker.cli.common import reports_errors
from interleave_thinker.context import Backends
from interleave_thinker.errors import DamagedCheckpointError, StorageError
from interleave_thinker.inspect import alist_threads, aload_document, athread_report
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import Document, RunOptions
from interleave_thinker.storage import atomic

SMALL = RunOptions(width=32, height=32)
REQUEST = "A seed falls. Rain comes. A sprout rises. Leaves unfold."
INTERLEAVE = Path(sys.executable).with_name("interleave")


def _backends(generator: RecordingGenerator | None = None) -> tuple[Backends, RecordingGenerator]:
    generator = generator or RecordingGenerator()
    return Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                    generator=generator), generator


def _sqlite(tmp_path: Path) -> tuple[Path, str]:
    run_dir = tmp_path / "runs"
    return run_dir, f"sqlite:///{run_dir}/checkpoints.sqlite"


async def _clean_document(tmp_path: Path, thread: str = "t") -> Document:
    backends, _ = _backends()
    result = await arun(REQUEST, backends=backends, options=SMALL, thread_id=thread,
                        run_dir=tmp_path / "clean", checkpointer=f"memory://{uuid.uuid4().hex}")
    return result.document


def _jobs(*generators: RecordingGenerator) -> list[tuple[int, int]]:
    return [(job.step, job.attempt) for g in generators for job in g.jobs]


def _assert_one_line(error: StorageError, *words: str) -> None:
    assert "\n" not in error.message and "\n" not in error.hint
    for word in words:
        assert word in f"{error.message} {error.hint}", (error.message, error.hint)


async def _fails_then_resumes(
    tmp_path: Path, run_dir: Path, url: str, words: tuple[str, ...], undo: Any = None,
    generator: RecordingGenerator | None = None,
) -> StorageError:
    """arun stops with a StorageError containing ``words``; once ``undo()`` ran, aresume ends
    with the clean run's document and no image is drawn twice."""
    backends, first = _backends(generator)
    with pytest.raises(StorageError) as stopped:
        await arun(REQUEST, backends=backends, options=SMALL, thread_id="t", run_dir=run_dir,
                   checkpointer=url)
    _assert_one_line(stopped.value, "interleave resume t", *words)
    if undo is not None:
        undo()
    backends, second = _backends()
    result = await aresume("t", backends=backends, run_dir=run_dir, checkpointer=url)
    clean = await _clean_document(tmp_path)
    assert result.document.content_for_comparison() == clean.content_for_comparison()
    assert result.document_path.is_file()
    jobs = _jobs(first, second)
    assert [job for job, count in Counter(jobs).items() if count > 1] == []
    return stopped.value


# --- SQLite -------------------------------------------------------------------------------------


async def test_a_full_sqlite_database_stops_with_one_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, url = _sqlite(tmp_path)
    original = savers._setup_sqlite

    async def with_a_page_limit(saver: Any, conn: Any) -> None:
        await original(saver, conn)
        # SQLite's own SQLITE_FULL, as on a full disk, once the file would pass a few pages.
        pages = (await (await conn.execute("PRAGMA page_count")).fetchone())[0]
        await conn.execute(f"PRAGMA max_page_count = {pages + 6}")

    monkeypatch.setattr(savers, "_setup_sqlite", with_a_page_limit)
    await _fails_then_resumes(
        tmp_path, run_dir, url, ("checkpoints.sqlite is full", "database or disk is full",
                                 "free disk space"),
        undo=lambda: monkeypatch.setattr(savers, "_setup_sqlite", original),
    )


async def test_a_database_locked_by_another_connection_stops_clearly_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, url = _sqlite(tmp_path)
    monkeypatch.setattr(savers, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    blocker: list[sqlite3.Connection] = []

    class LocksTheDatabase(RecordingGenerator):
        async def agenerate(self, jobs: Any) -> Any:
            if len(self.jobs) >= 2 and not blocker:
                # Another program takes the write lock and keeps it.
                other = sqlite3.connect(run_dir / "checkpoints.sqlite", check_same_thread=False)
                other.execute("BEGIN EXCLUSIVE")
                blocker.append(other)
            return await super().agenerate(jobs)

    def release() -> None:
        blocker[0].rollback()
        blocker[0].close()

    await _fails_then_resumes(
        tmp_path, run_dir, url, ("stayed locked", "database is locked"), undo=release,
        generator=LocksTheDatabase(),
    )


async def test_a_disk_io_error_stops_clearly_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from interleave_thinker.checkpoints.sqlite_saver import OneTripSqliteSaver

    run_dir, url = _sqlite(tmp_path)
    original = OneTripSqliteSaver.aput
    calls = Counter[str]()

    async def failing_aput(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["aput"] += 1
        if calls["aput"] == 4:
            raise sqlite3.OperationalError("disk I/O error")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(OneTripSqliteSaver, "aput", failing_aput)
    await _fails_then_resumes(
        tmp_path, run_dir, url, ("the disk failed", "disk I/O error", "dmesg"),
        undo=lambda: monkeypatch.setattr(OneTripSqliteSaver, "aput", original),
    )


async def test_a_malformed_database_file_is_named_as_damaged(tmp_path: Path) -> None:
    run_dir, url = _sqlite(tmp_path)
    backends, _ = _backends()
    await arun(REQUEST, backends=backends, options=SMALL, thread_id="t", run_dir=run_dir,
               checkpointer=url)
    database = run_dir / "checkpoints.sqlite"
    data = bytearray(database.read_bytes())
    page = 4096
    # Every page after the header page overwritten: b-tree pages no longer parse.
    for start in range(page, len(data), page):
        data[start:start + 64] = b"\xa5" * 64
    database.write_bytes(bytes(data))
    with pytest.raises(StorageError) as damaged:
        await aload_document("t", run_dir=run_dir, checkpointer=url)
    _assert_one_line(damaged.value, "checkpoints.sqlite is damaged", "backup", ".recover")


async def test_a_full_disk_under_the_document_page_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, url = _sqlite(tmp_path)
    real_fsync = os.fsync

    def full_under_documents(fd: int) -> None:
        if "/documents/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", full_under_documents)
    backends, generator = _backends()
    with pytest.raises(StorageError) as stopped:
        await arun(REQUEST, backends=backends, options=SMALL, thread_id="t", run_dir=run_dir,
                   checkpointer=url)
    page = run_dir / "documents" / "t" / "document.html"
    _assert_one_line(stopped.value, f"the document page {page}", "No space left on device",
                     "free disk space", "interleave resume t", "nothing is drawn again")
    assert not page.exists()
    assert list((run_dir / "documents" / ".incoming").iterdir()) == []
    drawn = len(generator.jobs)
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    result = await aresume("t", backends=backends, run_dir=run_dir, checkpointer=url)
    assert page.is_file() and result.document_path == page
    assert len(generator.jobs) == drawn


def _flip(database: Path, old: bytes, new: bytes) -> None:
    data = database.read_bytes()
    assert old in data
    database.write_bytes(data.replace(old, new))


@pytest.mark.parametrize(
    ("old", "new", "detail"),
    [
        # A field name: the record misses "number" and has "4umber" (exported silently before).
        (b"number", b"4umber", "record does not validate: steps.0.number: Field required"),
        # A record type of ours that does not exist.
        (b"RunSettings", b"RunSettingz", "unknown record type interleave_thinker.state.RunSettingz"),
        # A module name that is no longer ours: LangGraph hands back a plain dict.
        (b"interleave_thinker.state", b"interleave_thinkes.state", "is a dict, not a"),
    ],
)
async def test_flipped_bytes_in_a_checkpoint_name_the_damaged_thread(
    tmp_path: Path, old: bytes, new: bytes, detail: str
) -> None:
    run_dir, url = _sqlite(tmp_path)
    backends, _ = _backends()
    options = SMALL
    for thread in ("t", "healthy"):
        await arun(REQUEST, backends=backends, options=options, thread_id=thread,
                   run_dir=run_dir, checkpointer=url)
    database = run_dir / "checkpoints.sqlite"
    # Only thread t's rows: flip inside every blob of t, keep "healthy" intact.
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT rowid, checkpoint FROM checkpoints WHERE thread_id = 't'"
        ).fetchall()
        for rowid, blob in rows:
            conn.execute("UPDATE checkpoints SET checkpoint = ? WHERE rowid = ?",
                         (blob.replace(old, new), rowid))
        assert len(rows) > 1

    calls: list[Any] = [
        aload_document("t", run_dir=run_dir, checkpointer=url),
        athread_report("t", run_dir=run_dir, checkpointer=url),
        aresume("t", backends=backends, run_dir=run_dir, checkpointer=url),
        arun(REQUEST, backends=backends, options=options, thread_id="t", run_dir=run_dir,
             checkpointer=url),
    ]
    for call in calls:
        with pytest.raises(DamagedCheckpointError) as damaged:
            await call
        assert damaged.value.message.startswith("the checkpoint of thread t is damaged: ")
        assert detail in damaged.value.message
        _assert_one_line(damaged.value, "backup")
    listed = {s.thread_id: s.status for s in await alist_threads(run_dir=run_dir, checkpointer=url)}
    assert listed == {"t": "damaged", "healthy": "done"}


def test_the_cli_reports_a_damaged_thread_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, url = _sqlite(tmp_path)
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(run_dir))
    asyncio.run(arun(REQUEST, backends=_backends()[0], options=SMALL, thread_id="t",
                     run_dir=run_dir, checkpointer=url))
    _flip(run_dir / "checkpoints.sqlite", b"number", b"4umber")
    for args in (["show", "t"], ["show", "t", "--json"],
                 ["export", "t", "--format", "json", "-o", str(tmp_path / "t.json")],
                 ["export", "t", "--format", "html", "-o", str(tmp_path / "t.html")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 2 and "Traceback" not in result.output
        assert lines[0].startswith("error: the checkpoint of thread t is damaged: ")
        assert lines[1].startswith("hint: ")
    assert not (tmp_path / "t.json").exists()


def test_an_untranslated_storage_fault_still_reaches_the_user_as_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import typer

    @reports_errors
    def command() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(typer.Exit):
        command()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: the checkpoint database is full") and err[1].startswith("hint:")

    @reports_errors
    def bug() -> None:
        raise KeyError("a bug stays a traceback")

    with pytest.raises(KeyError):
        bug()


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/y.png"),
         "no space left on the disk while writing /x/y.png"),
        (OSError(errno.EIO, "Input/output error"), "the disk failed"),
        (OSError(errno.EROFS, "Read-only file system", "/x"), "cannot write /x: Read-only file system"),
        (sqlite3.DatabaseError("database disk image is malformed"), "is damaged"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read-only"),
    ],
)
def test_each_fault_has_its_own_words(exc: BaseException, words: str) -> None:
    error = storage_error(exc, thread_id="t", checkpointer_url="sqlite:///db.sqlite")
    assert error is not None and words in error.message and "\n" not in error.message
    assert storage_error(OSError(errno.ENOENT, "missing"), thread_id="t") is None
    assert storage_error(ValueError("x")) is None


# --- a real full file system ---------------------------------------------------------------------

# Mount a tmpfs: directly when root, else in a user namespace (unshare -r) where allowed.
_MOUNT_SCRIPT = """
set -u
mount -t tmpfs -o size="$SIZE" tmpfs "$MNT" || exit 97
export INTERLEAVE_RUN_DIR="$MNT/runs"
"$INTERLEAVE" run --profile test --size 32x32 --thread full "$REQUEST" >"$OUT/out1" 2>"$OUT/err1"
echo $? >"$OUT/rc1"
mount -o remount,size=64m "$MNT"
"$INTERLEAVE" resume full >"$OUT/out2" 2>"$OUT/err2"
echo $? >"$OUT/rc2"
"$INTERLEAVE" export full --format json -o "$OUT/doc.json" 2>"$OUT/err3"
umount "$MNT"
"""


def _namespace_command() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for command in ([unshare, "--mount"], [unshare, "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*command, "sh", "-c", "mount -t tmpfs tmpfs /mnt 2>/dev/null"],
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return command
    return None


@pytest.mark.slow
@pytest.mark.parametrize("size", ["96k", "160k", "256k"])
def test_a_real_full_file_system_stops_in_one_line_and_resumes_once_freed(
    tmp_path: Path, size: str
) -> None:
    namespace = _namespace_command()
    if namespace is None:
        pytest.skip("this machine lets the test mount no tmpfs (no root, no user namespaces)")
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    env = {**os.environ, "SIZE": size, "MNT": str(mount), "OUT": str(out),
           "INTERLEAVE": str(INTERLEAVE), "REQUEST": REQUEST,
           "INTERLEAVE_TEST_GENERATOR_DELAY": "0"}
    done = subprocess.run([*namespace, "sh", "-c", _MOUNT_SCRIPT], env=env, timeout=300, check=False)
    assert done.returncode == 0
    stderr = (out / "err1").read_text()
    assert (out / "rc1").read_text().strip() == "1", stderr
    assert "Traceback" not in stderr
    error, hint = stderr.strip().splitlines()[-2:]
    assert error.startswith("error: ") and hint.startswith("hint: free disk space, then ")
    assert "full" in error or "No space left" in error, error
    assert (out / "rc2").read_text().strip() == "0", (out / "err2").read_text()
    exported = json.loads((out / "doc.json").read_text())["document"]
    clean = asyncio.run(_clean_document(tmp_path, "full"))
    assert [step["text"] for step in exported["steps"]] == [step.text for step in clean.steps]
    assert [step["image"] and step["image"]["sha256"] for step in exported["steps"]] == [
        step.image and step.image.sha256 for step in clean.steps
    ]


# --- batches --------------------------------------------------------------------------------------


def _prompts(tmp_path: Path, count: int = 3) -> tuple[Path, list[str]]:
    prefix = uuid.uuid4().hex[:8]
    ids = [f"{prefix}-{n}" for n in range(count)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(
        json.dumps({"id": pid, "text": f"Scene {n} opens. Scene {n} closes."}) + "\n"
        for n, pid in enumerate(ids)
    ))
    return path, ids


async def test_a_batch_survives_one_prompts_storage_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from interleave_thinker.checkpoints.sqlite_saver import OneTripSqliteSaver

    run_dir, url = _sqlite(tmp_path)
    prompts, ids = _prompts(tmp_path)
    doomed = thread_id_for(ids[1])
    original = OneTripSqliteSaver.aput

    async def full_for_one_thread(self: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        if config["configurable"]["thread_id"] == doomed:
            raise sqlite3.OperationalError("database or disk is full")
        return await original(self, config, *args, **kwargs)

    monkeypatch.setattr(OneTripSqliteSaver, "aput", full_for_one_thread)
    backends, _ = _backends()
    report = await arun_batch(prompts, backends=backends, options=SMALL, concurrency=3,
                              run_dir=run_dir, checkpointer=url)
    statuses = {o.thread_id: o for o in report.outcomes}
    assert statuses[doomed].status == "failed" and "is full" in (statuses[doomed].error or "")
    assert sorted(o.status for t, o in statuses.items() if t != doomed) == ["done", "done"]
    rows = [json.loads(line) for line in report.manifest.read_text().splitlines()]
    assert len(rows) == 3 and report.index.is_file()
    monkeypatch.setattr(OneTripSqliteSaver, "aput", original)
    report = await arun_batch(prompts, backends=backends, options=SMALL, concurrency=3,
                              run_dir=run_dir, checkpointer=url)
    assert report.failed == 0


async def test_a_batch_writes_its_manifest_when_the_checkpointer_cannot_be_opened(
    tmp_path: Path,
) -> None:
    prompts, ids = _prompts(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url = f"sqlite:///{blocker}/checkpoints.sqlite"
    backends, _ = _backends()
    with pytest.raises((StorageError, OSError)):
        await arun_batch(prompts, backends=backends, options=SMALL, run_dir=tmp_path / "runs",
                         checkpointer=url)
    manifest = tmp_path / "runs" / "batches" / "prompts" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [row["prompt_id"] for row in rows] == ids
    assert all(row["status"] == "failed" and row["error"].startswith("not run: ") for row in rows)
    assert (manifest.parent / "index.html").is_file()


async def test_an_interrupted_batch_still_writes_every_row(tmp_path: Path) -> None:
    run_dir, url = _sqlite(tmp_path)
    prompts, ids = _prompts(tmp_path, 4)

    class Slow(RecordingGenerator):
        async def agenerate(self, jobs: Any) -> Any:
            if any(job.thread_id != thread_id_for(ids[0]) for job in jobs):
                await asyncio.sleep(60)
            return await super().agenerate(jobs)

    backends, _ = _backends(Slow())
    task = asyncio.create_task(arun_batch(prompts, backends=backends, options=SMALL,
                                          concurrency=4, max_batch=1, max_in_flight=None,
                                          run_dir=run_dir, checkpointer=url))
    manifest = run_dir / "batches" / "prompts" / "manifest.jsonl"
    for _ in range(600):
        await asyncio.sleep(0.05)
        if (run_dir / "documents" / thread_id_for(ids[0]) / "document.html").exists():
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = {row["prompt_id"]: row for row in map(json.loads, manifest.read_text().splitlines())}
    assert rows[ids[0]]["status"] == "done"
    for pid in ids[1:]:
        assert rows[pid]["status"] == "failed" and "run the batch again" in rows[pid]["error"]


# --- PostgreSQL -----------------------------------------------------------------------------------


def _admin(url: str) -> Any:
    import psycopg

    from interleave_thinker.checkpoints.postgres import parse_url

    return psycopg.connect(parse_url(url).conninfo, autocommit=True)


async def test_a_postgres_session_ended_by_an_administrator_is_one_line_and_resumes(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    # The run's connections carry a name of their own (libpq reads $PGAPPNAME).
    name = f"interleave-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("PGAPPNAME", name)
    async with savers.open_checkpointer(postgres_url):
        pass  # the tables exist before the trigger goes on them
    with _admin(postgres_url) as admin:
        # The 4th checkpoint write waits on the server, long enough to be ended from outside.
        admin.execute("CREATE SEQUENCE slow_seq")
        admin.execute("""
            CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('slow_seq') = 4 THEN PERFORM pg_sleep(30); END IF;
                RETURN NEW;
            END $$""")
        admin.execute("CREATE TRIGGER slow BEFORE INSERT ON checkpoints "
                      "FOR EACH ROW EXECUTE FUNCTION slow_write()")
    ended = threading.Event()

    def terminate_the_sleeping_session() -> None:
        # Another session ends the writer mid-statement: the real AdminShutdown.
        with _admin(postgres_url) as admin:
            admin.execute("SET application_name = 'interleave-test-admin'")
            for _ in range(600):
                row = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND wait_event = 'PgSleep'", (name,)
                ).fetchone()
                if row and row[0]:
                    ended.set()
                    return
                time.sleep(0.05)

    killer = threading.Thread(target=terminate_the_sleeping_session, daemon=True)
    killer.start()

    def drop_trigger() -> None:
        with _admin(postgres_url) as admin:
            admin.execute("DROP TRIGGER slow ON checkpoints")

    error = await _fails_then_resumes(
        tmp_path, tmp_path / "runs", postgres_url,
        ("lost the connection to the checkpointer postgresql://", "check that the server runs"),
        undo=drop_trigger,
    )
    killer.join(timeout=5)
    assert ended.is_set()
    # Ended inside a pipelined write, psycopg sees the socket close ("server closed the
    # connection unexpectedly"); on a plain statement it reads AdminShutdown's own words.
    assert isinstance(error.__cause__, psycopg.OperationalError)
    assert "server closed the connection" in error.message or "administrator" in error.message


def test_admin_shutdown_and_pool_timeout_have_their_own_words(postgres_driver: None) -> None:
    import psycopg
    import psycopg_pool

    url = "postgresql://me:secret@db.example:5432/runs"
    shutdown = storage_error(
        psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
        thread_id="t", checkpointer_url=url,
    )
    assert shutdown is not None and shutdown.message == (
        "lost the connection to the checkpointer postgresql://me:***@db.example:5432/runs: "
        "terminating connection due to administrator command"
    )
    timeout = storage_error(psycopg_pool.PoolTimeout("couldn't get a connection after 30.00 sec"),
                            thread_id="t", checkpointer_url=url)
    assert timeout is not None and timeout.message.startswith("no connection to the checkpointer")
    assert "interleave resume t" in timeout.hint and "secret" not in timeout.message + timeout.hint


async def test_a_pool_that_cannot_reconnect_fails_the_prompts_clearly_and_keeps_the_manifest(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg_pool

    class QuickPool(psycopg_pool.AsyncConnectionPool):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "timeout": 1.0})

    monkeypatch.setattr(psycopg_pool, "AsyncConnectionPool", QuickPool)
    role = f"interleave_test_{uuid.uuid4().hex[:12]}"
    with _admin(postgres_url) as admin:
        schema = admin.execute("SELECT current_schema()").fetchone()[0]
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{role}"')
    parts = urlsplit(postgres_url)
    url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))

    def cut(login: bool) -> None:
        with _admin(postgres_url) as admin:
            admin.execute(f'ALTER ROLE "{role}" {"LOGIN" if login else "NOLOGIN"}')
            if not login:
                # Every session of the role dropped, and no new one allowed: the pool waits.
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE usename = %s", (role,))

    class CutsTheDatabase(RecordingGenerator):
        async def agenerate(self, jobs: Any) -> Any:
            if len(self.jobs) == 2:
                cut(login=False)
            return await super().agenerate(jobs)

    prompts, _ = _prompts(tmp_path, 2)
    try:
        backends, first = _backends(CutsTheDatabase())
        report = await arun_batch(prompts, backends=backends, options=SMALL, concurrency=2,
                                  run_dir=tmp_path / "runs", checkpointer=url)
        assert [o.status for o in report.outcomes] == ["failed", "failed"]
        for outcome in report.outcomes:
            assert outcome.error and outcome.error.startswith(
                f"no connection to the checkpointer postgresql://{role}@"
            ), outcome.error
        rows = [json.loads(line) for line in report.manifest.read_text().splitlines()]
        assert len(rows) == 2 and report.index.is_file()
        cut(login=True)
        backends, second = _backends()
        report = await arun_batch(prompts, backends=backends, options=SMALL, concurrency=2,
                                  run_dir=tmp_path / "runs", checkpointer=url)
        assert report.failed == 0
        jobs = [(j.thread_id, j.step, j.attempt) for j in first.jobs + second.jobs]
        assert [job for job, count in Counter(jobs).items() if count > 1] == []
    finally:
        with _admin(postgres_url) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                          (role,))
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')
