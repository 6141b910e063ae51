"""PostgreSQL checkpoints: graph behaviour on every saver, URL handling, crash resume and setup races."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from conftest import RecordingGenerator, postgres_test_hosts, scripted
from interleave_thinker.checkpoints.postgres import mask_password, parse_url
from interleave_thinker.checkpoints.savers import open_checkpointer
from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError, ModelOutputError, SettingsMismatchError
from interleave_thinker.generators.stand_in import DELAY_ENV
from interleave_thinker.inspect import alist_threads, aload_document
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import RunOptions
from test_crash_resume import DELAY, REQUEST, _calls, _document, _finish, _interleave
from test_graph import backends, plan_reply, step, verdict_reply

# Every test may talk to the server; pytest-socket allows only its host.
pytestmark = pytest.mark.allow_hosts(postgres_test_hosts())

ThreadMaker = Callable[[], str]


def _make_thread() -> str:
    # Each PostgreSQL test has a schema of its own (conftest.postgres_url); ids stay unique anyway.
    return f"t-{uuid.uuid4().hex}"


@pytest.fixture
def new_thread() -> ThreadMaker:
    return _make_thread


@pytest.fixture
def pg_thread(postgres_url: str) -> ThreadMaker:
    return _make_thread


# --- The graph's behaviour is the same on every checkpointer ---------------------------------


async def test_run_completes_and_resuming_the_finished_thread_draws_nothing(
    checkpointer_url: str, new_thread: ThreadMaker, run_dir: Path, small: RunOptions
) -> None:
    thread = new_thread()
    first = await arun("A boat. A storm. A rainbow.", profile="test", options=small,
                       run_dir=run_dir, checkpointer=checkpointer_url, thread_id=thread)
    assert [s.number for s in first.document.steps] == [1, 2, 3]
    assert all(s.image is not None for s in first.document.steps)
    assert first.document_path.is_file()
    generator = RecordingGenerator()
    same_models = Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(), generator=generator)
    again = await aresume(thread, profile="test", backends=same_models, run_dir=run_dir,
                          checkpointer=checkpointer_url)
    assert again.document == first.document
    assert generator.jobs == []
    assert await aload_document(thread, run_dir=run_dir, checkpointer=checkpointer_url) == \
        first.document


async def test_thread_stopped_by_the_critic_resumes_with_its_drawn_image(
    checkpointer_url: str, new_thread: ThreadMaker, run_dir: Path, small: RunOptions
) -> None:
    thread = new_thread()
    planner = scripted([plan_reply([step(5, "x")])])
    critic = scripted(lambda _: "<answer>{'previous_step_success': 'maybe'}</answer>")
    generator = RecordingGenerator()
    with pytest.raises(ModelOutputError, match=rf"thread {thread}, step 5, attempt 1"):
        await arun("x", backends=backends(planner, critic, generator), options=small,
                   run_dir=run_dir, checkpointer=checkpointer_url, thread_id=thread)
    (listed,) = [t for t in await alist_threads(run_dir=run_dir, checkpointer=checkpointer_url)
                 if t.thread_id == thread]
    assert listed.status != "done"
    # A new opening of the checkpointer (as a new process would) still has the drawn image.
    fixed = Backends(planner=planner, critic=scripted(lambda _: verdict_reply(True)),
                     generator=generator)
    result = await aresume(thread, backends=fixed, run_dir=run_dir, checkpointer=checkpointer_url)
    assert len(generator.jobs) == 1
    assert result.document.steps[0].status == "accepted"


async def test_finished_thread_is_listed(
    checkpointer_url: str, new_thread: ThreadMaker, run_dir: Path, small: RunOptions
) -> None:
    thread = new_thread()
    result = await arun("A kite. The wind.", profile="test", options=small, run_dir=run_dir,
                        checkpointer=checkpointer_url, thread_id=thread)
    listed = {t.thread_id: t for t in await alist_threads(run_dir=run_dir,
                                                          checkpointer=checkpointer_url)}
    summary = listed[thread]
    assert summary.status == "done"
    assert summary.request == "A kite. The wind."
    assert summary.steps == 2
    assert summary.generator_calls == result.document.generator_calls
    assert summary.updated_at


async def test_resume_with_other_settings_is_refused(
    checkpointer_url: str, new_thread: ThreadMaker, run_dir: Path, small: RunOptions
) -> None:
    thread = new_thread()
    where = {"run_dir": run_dir, "checkpointer": checkpointer_url}
    await arun("A boat. A storm.", profile="test", options=small, thread_id=thread, **where)
    with pytest.raises(SettingsMismatchError, match=r"options\.budget\.max_attempts.*3.*5"):
        await aresume(thread, changes={"max_attempts": 5}, **where)
    with pytest.raises(SettingsMismatchError, match="request"):
        await arun("A different boat.", profile="test", options=small, thread_id=thread, **where)
    again = await arun("A boat. A storm.", profile="test", options=small, thread_id=thread,
                       **where)
    assert again.document == await aload_document(thread, **where)


# --- URLs and errors that need no server ------------------------------------------------------


def test_pool_parameters_are_taken_out_of_the_url() -> None:
    target = parse_url("postgresql://u:p@db:5433/runs?pool_max=8&sslmode=disable&pool_min=2")
    assert target.conninfo == "postgresql://u:p@db:5433/runs?sslmode=disable"
    assert (target.pool_min, target.pool_max) == (2, 8)
    plain = parse_url("postgres://db/runs")
    assert plain.conninfo == "postgres://db/runs"
    assert plain.pool_min <= plain.pool_max


@pytest.mark.parametrize("query", ["pool_max=0", "pool_max=many", "pool_min=-1",
                                   "pool_min=5&pool_max=2"])
def test_bad_pool_parameters_are_refused(query: str) -> None:
    with pytest.raises(ConfigurationError, match="pool_m") as info:
        parse_url(f"postgresql://u:secret@db/runs?{query}")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:s3cret@db:5432/runs", "postgresql://u:***@db:5432/runs"),
    ("postgres://u@db/runs?password=s3cret&sslmode=require",
     "postgres://u@db/runs?password=***&sslmode=require"),
    ("postgresql://db/runs", "postgresql://db/runs"),
])
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert mask_password(url) == shown


@pytest.mark.usefixtures("postgres_driver")
async def test_refused_connection_names_the_url_without_its_password() -> None:
    # Port 1 on the loopback address: nothing listens there, so the connection is refused.
    url = "postgresql://someone:s3cret@127.0.0.1:1/runs"
    with pytest.raises(ConfigurationError, match="cannot connect") as info:
        async with open_checkpointer(url):
            pass
    assert "postgresql://someone:***@127.0.0.1:1/runs" in str(info.value)
    assert "s3cret" not in str(info.value) + info.value.hint


@pytest.mark.usefixtures("postgres_driver")
async def test_unknown_libpq_parameter_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not a valid PostgreSQL URL"):
        async with open_checkpointer("postgresql://127.0.0.1/runs?no_such_option=1"):
            pass


def test_modules_import_without_psycopg_and_say_how_to_install_it() -> None:
    # A fresh interpreter where psycopg cannot be imported, as without the [postgres] extra.
    script = textwrap.dedent("""
        import asyncio, sys
        sys.modules["psycopg"] = None
        import interleave_thinker.checkpoints.postgres
        import interleave_thinker.runner
        from interleave_thinker.checkpoints.savers import open_checkpointer
        from interleave_thinker.errors import ConfigurationError

        async def main():
            try:
                async with open_checkpointer("postgresql://db/runs"):
                    pass
            except ConfigurationError as error:
                print(error.hint)

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'interleave-thinker[postgres]'" in done.stdout


# --- PostgreSQL itself ------------------------------------------------------------------------


async def test_missing_database_names_the_url_without_its_password(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    # Add a password (ignored under trust auth) when there is none, to see that it is masked.
    netloc = f"{userinfo}:s3cret@{hostinfo}" if at and ":" not in userinfo else parts.netloc
    missing = f"interleave_missing_{uuid.uuid4().hex[:12]}"
    url = urlunsplit(parts._replace(netloc=netloc, path=f"/{missing}"))
    with pytest.raises(ConfigurationError, match="cannot connect") as info:
        async with open_checkpointer(url):
            pass
    assert mask_password(url) in str(info.value)
    assert missing in str(info.value)
    assert "s3cret" not in str(info.value)


async def test_pool_size_comes_from_the_url(postgres_url: str) -> None:
    separator = "&" if urlsplit(postgres_url).query else "?"
    async with open_checkpointer(f"{postgres_url}{separator}pool_max=2") as saver:
        pool = saver.conn  # type: ignore[attr-defined]
        assert (pool.min_size, pool.max_size) == (1, 2)
        assert await saver.aget_tuple({"configurable": {"thread_id": "none", "checkpoint_ns": ""}}
                                      ) is None


@pytest.mark.slow
def test_sigkill_then_resume_on_postgres_matches_an_uninterrupted_run(
    postgres_url: str, pg_thread: ThreadMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    thread, kill_after = pg_thread(), 3
    # The uninterrupted run, in this process and without the generator's delay, which changes
    # nothing in the document.
    clean_log = tmp_path / "clean.log"
    monkeypatch.setenv("INTERLEAVE_TEST_CALL_LOG", str(clean_log))
    monkeypatch.delenv(DELAY_ENV, raising=False)
    clean = asyncio.run(arun(REQUEST, profile="test",
                             options=RunOptions().with_changes(width=96, height=96),
                             run_dir=tmp_path / "clean", checkpointer=f"memory://{thread}",
                             thread_id=thread))
    expected = clean.document.model_dump(mode="json")["steps"]
    for item in expected:
        for attempt in item["attempts"]:
            for timing in ("started_at", "generation_seconds", "critique_seconds", "reused"):
                attempt.pop(timing)
    clean_calls = _calls(clean_log)
    assert len(clean_calls) > kill_after + 1

    # export (inside _document) takes the checkpointer from the environment.
    monkeypatch.setenv("INTERLEAVE_CHECKPOINTER", postgres_url)
    crash_dir, crash_log = tmp_path / "crash", tmp_path / "crash.log"
    process = _interleave("run", "--profile", "test", "--size", "96x96", "--thread", thread,
                          "--checkpointer", postgres_url, REQUEST,
                          run_dir=crash_dir, call_log=crash_log)
    deadline = time.monotonic() + 60
    while len(_calls(crash_log)) < kill_after:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # Half a generator delay later the process is inside the next call: k calls are finished.
    time.sleep(DELAY / 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()  # reaps it and closes its pipes
    assert process.returncode == -signal.SIGKILL
    assert len(_calls(crash_log)) == kill_after

    _finish(_interleave("resume", thread, "--checkpointer", postgres_url,
                        run_dir=crash_dir, call_log=crash_log))
    calls = _calls(crash_log)
    repeated = [call for call, count in Counter(calls).items() if count > 1]
    assert repeated == [], f"finished generator calls were repeated: {repeated}"
    assert sorted(calls) == sorted(clean_calls)
    assert _document(crash_dir, crash_log, thread) == expected


# Waits for a go file, so that every process opens the checkpointer at the same moment.
RACER = textwrap.dedent("""
    import asyncio, os, sys, time
    import langgraph.checkpoint.postgres.aio, psycopg_pool
    from interleave_thinker.checkpoints.savers import open_checkpointer

    url, go = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)

    async def main():
        async with open_checkpointer(url) as saver:
            config = {"configurable": {"thread_id": "none", "checkpoint_ns": ""}}
            assert await saver.aget_tuple(config) is None
    asyncio.run(main())
    print("opened", flush=True)
""")


@pytest.fixture
def fresh_database(postgres_url: str) -> str:
    """No checkpoint tables yet: postgres_url's schema is new and empty."""
    return postgres_url


@pytest.mark.slow
def test_processes_setting_up_a_fresh_database_at_once_all_succeed(
    fresh_database: str, tmp_path: Path
) -> None:
    import psycopg
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    go = tmp_path / "go"
    # Unguarded, LangGraph's setup() fails in all but one of 4 racers (duplicate keys).
    racers = [subprocess.Popen([sys.executable, "-c", RACER, fresh_database, str(go)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    try:
        for racer in racers:
            assert racer.stdout is not None
            if racer.stdout.readline().strip() != "ready":
                pytest.fail(f"a racer did not start: {racer.communicate(timeout=10)[1]}")
        go.touch()
        results = [racer.communicate(timeout=60) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
    for racer, (stdout, stderr) in zip(racers, results, strict=True):
        assert racer.returncode == 0, stderr
        assert stdout.strip() == "opened"
    with psycopg.connect(fresh_database) as conn:
        versions = [v for (v,) in conn.execute("SELECT v FROM checkpoint_migrations ORDER BY v")]
    assert versions == list(range(len(AsyncPostgresSaver.MIGRATIONS)))

