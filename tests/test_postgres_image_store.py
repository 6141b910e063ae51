"""The PostgreSQL image store: images, generation ledger and verdicts shared through one database."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from langgraph.runtime import Runtime
from PIL import Image
from typer.testing import CliRunner

from conftest import RecordingGenerator, postgres_test_hosts
from interleave_thinker.checkpoints.postgres import parse_url
from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError, ImageError
from interleave_thinker.gc import GarbageCollectionRefused, acollect_garbage
from interleave_thinker.generators.stand_in import DELAY_ENV
from interleave_thinker.inspect import aload_document
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.nodes.generator import generate_images
from interleave_thinker.render.export import referenced_images
from interleave_thinker.runner import arun, chosen_image_store
from interleave_thinker.settings import ModelSettings
from interleave_thinker.state import Critique, RunOptions
from interleave_thinker.storage.image_store import ImageStore, encode_png, image_ref, png_image
from interleave_thinker.storage.ledger import generation_key
from interleave_thinker.storage.postgres_images import (
    IMAGES_TABLE,
    PostgresDatabase,
    PostgresImageStore,
    close_databases,
)
from interleave_thinker.storage.stores import open_stores
from interleave_thinker.storage.verdicts import verdict_key
from interleave_thinker.workspace import Workspace
from test_crash_resume import DELAY, REQUEST, _calls, _finish, _interleave
from test_generation_ledger_reuse import _state

pytestmark = pytest.mark.allow_hosts(postgres_test_hosts())

SMALL = RunOptions(width=48, height=48)


@pytest.fixture(autouse=True)
def _close_pools() -> Iterator[None]:
    yield
    close_databases()


def sql(url: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """A query on a connection of its own (as another process would see the database)."""
    import psycopg

    with psycopg.connect(parse_url(url).conninfo, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    return encode_png(Image.new("RGB", (size, size), color))


def pg_store(url: str, tmp_path: Path) -> PostgresImageStore:
    store = Workspace.open(tmp_path / "runs", "memory://x", url).image_store
    assert isinstance(store, PostgresImageStore)
    return store


def backends(generator: RecordingGenerator | None = None) -> Backends:
    return Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                    generator=generator or RecordingGenerator())


# --- the store ----------------------------------------------------------------------------------


def test_images_round_trip(postgres_url: str, tmp_path: Path) -> None:
    store = pg_store(postgres_url, tmp_path)
    data = png((200, 10, 10))
    ref = store.put(data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert (ref.media_type, ref.width, ref.height) == ("image/png", 8, 8)
    assert store.read(ref) == data
    assert store.find(ref.sha256) == ref
    assert store.contains(ref) and store.touch(ref)
    with store.open(ref) as image:
        assert image.size == (8, 8) and image.getpixel((0, 0)) == (200, 10, 10)
    # Storing it again keeps one row; a PIL image and a user's input go the same way.
    assert store.put(data) == ref
    drawn = store.put_image(Image.new("RGB", (4, 6), "white"))
    rgba = Image.new("RGBA", (5, 5), (0, 0, 0, 0))
    user = store.put_input(encode_png(rgba), what="input image")
    assert store.read(user) != encode_png(rgba)  # made opaque RGB before it was stored
    assert {row[0] for row in sql(postgres_url, f"SELECT sha256 FROM {IMAGES_TABLE}")} == {
        ref.sha256, drawn.sha256, user.sha256}
    # Nothing about this store is in the run directory.
    assert not (tmp_path / "runs").exists()


def test_unknown_and_malformed_hashes_are_image_errors(postgres_url: str, tmp_path: Path) -> None:
    store = pg_store(postgres_url, tmp_path)
    ref = store.put(png((1, 2, 3)))
    sql(postgres_url, f"DELETE FROM {IMAGES_TABLE}")
    with pytest.raises(ImageError, match=rf"image {ref.short} is missing from the PostgreSQL image store"):
        store.read(ref)
    assert not store.contains(ref) and not store.touch(ref)
    with pytest.raises(ImageError, match="no image"):
        store.find(ref.sha256)
    with pytest.raises(ImageError, match="is not an image hash"):
        store.find("../etc/passwd")


def test_a_damaged_row_is_a_clear_error_on_read_and_storing_again_repairs_it(
    postgres_url: str, tmp_path: Path
) -> None:
    stores = Workspace.open(tmp_path / "runs", "memory://x", postgres_url).stores()
    store = stores.images
    data = png((10, 200, 10))
    ref = store.put(data)
    key = generation_key(step=1)
    stores.ledger.record(key, ref, thread_id="t")
    assert stores.ledger.lookup(key) == ref
    # One byte flipped inside the row, as a disk or a hand-edit might.
    sql(postgres_url, f"UPDATE {IMAGES_TABLE} SET data = set_byte(data, 20, get_byte(data, 20) # 255)")
    with pytest.raises(ImageError, match=rf"image {ref.short} in the PostgreSQL image store .* does "
                                         "not match its hash: the row was changed or damaged"):
        store.read(ref)
    assert not store.contains(ref)
    # The ledger no longer trusts it: the generator draws it again ...
    assert stores.ledger.lookup(key) is None
    # ... and storing it again repairs the row.
    assert store.put(data) == ref
    assert store.read(ref) == data and stores.ledger.lookup(key) == ref


def test_a_stored_image_and_its_records_are_committed_when_the_call_returns(
    postgres_url: str, tmp_path: Path
) -> None:
    stores = Workspace.open(tmp_path / "runs", "memory://x", postgres_url).stores()
    image = png_image(Image.new("RGB", (16, 16), (1, 99, 7)))
    ref = stores.images.put_checked(image)
    # Another connection (another process, another machine) sees it at once: it was committed
    # before put_checked returned, so a checkpoint written next can name it.
    ((data, media, width, height),) = sql(
        postgres_url, f"SELECT data, media_type, width, height FROM {IMAGES_TABLE} WHERE sha256 = %s",
        (ref.sha256,))
    assert (bytes(data), media, width, height) == (image.data, "image/png", 16, 16)
    key = generation_key(step=2)
    stores.ledger.record(key, ref, thread_id="t1")
    assert sql(postgres_url, "SELECT thread_id, sha256 FROM interleave_generations WHERE key = %s",
               (key,)) == [("t1", ref.sha256)]
    verdict = verdict_key(step=1)
    critique = Critique(success=True, score=0.9, reasoning="fine")
    stores.verdicts.record(verdict, critique, seconds=1.5, thread_id="t1", step=1, attempt=1)
    assert sql(postgres_url, "SELECT thread_id FROM interleave_verdicts WHERE key = %s",
               (verdict,)) == [("t1",)]
    # A second machine (its own pool, its own empty run directory) reads all three.
    other = open_stores(postgres_url, tmp_path / "elsewhere")
    other_db = PostgresDatabase(postgres_url)
    try:
        assert PostgresImageStore(other_db).read(ref) == image.data
        assert other.ledger.lookup(key) == ref
        found = other.verdicts.lookup(verdict)
        assert found is not None and found.critique == critique and found.seconds == 1.5
    finally:
        other_db.close()


def test_a_connection_the_server_ended_is_replaced(postgres_url: str) -> None:
    name = f"interleave-test-{uuid.uuid4().hex[:8]}"
    database = PostgresDatabase(f"{postgres_url}&application_name={name}")
    store = PostgresImageStore(database)
    try:
        ref = store.put(png((7, 7, 7)))
        # A server restart, or an administrator, ends every connection of the pool.
        ended = sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE application_name = %s", (name,))
        assert ended and all(row[0] for row in ended)
        assert store.read(ref) == png((7, 7, 7))
    finally:
        database.close()


def test_concurrent_writers_of_one_image_all_succeed_with_one_row(
    postgres_url: str, tmp_path: Path
) -> None:
    data = png((5, 5, 250), size=32)
    databases = [PostgresDatabase(postgres_url) for _ in range(6)]
    barrier = threading.Barrier(len(databases))
    refs, errors = [], []

    def writer(database: PostgresDatabase) -> None:
        store = PostgresImageStore(database)
        try:
            database.pool()  # connected (and the tables made) before the race starts
            barrier.wait()
            for _ in range(5):
                refs.append(store.put(data))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(db,)) for db in databases]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for database in databases:
            database.close()
    assert errors == []
    assert len(refs) == 30 and len(set(refs)) == 1
    assert sql(postgres_url, f"SELECT count(*) FROM {IMAGES_TABLE}") == [(1,)]


# Each process opens a fresh store (tables not created yet) at the same moment and stores the same
# image, and one of its own.
WRITER = textwrap.dedent("""
    import os, sys, time
    from PIL import Image
    from interleave_thinker.storage.image_store import encode_png
    from interleave_thinker.storage.stores import open_image_store

    url, go, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import psycopg, psycopg_pool
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    store = open_image_store(url, None)
    shared = encode_png(Image.new("RGB", (64, 64), (9, 8, 7)))
    own = encode_png(Image.new("RGB", (8, 8), (index, 0, 0)))
    refs = {store.put(shared).sha256 for _ in range(20)}
    assert store.read(store.find(refs.pop())) == shared
    store.put(own)
    print("stored", flush=True)
""")


@pytest.mark.slow
def test_processes_storing_the_same_image_at_once_all_succeed(postgres_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, postgres_url, str(go), str(index)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for index in range(4)]
    try:
        for writer in writers:
            assert writer.stdout is not None
            if writer.stdout.readline().strip() != "ready":
                pytest.fail(f"a writer did not start: {writer.communicate(timeout=10)[1]}")
        go.touch()
        results = [writer.communicate(timeout=60) for writer in writers]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    for writer, (stdout, stderr) in zip(writers, results, strict=True):
        assert writer.returncode == 0, stderr
        assert stdout.strip() == "stored"
    assert sql(postgres_url, f"SELECT count(*) FROM {IMAGES_TABLE}") == [(5,)]


# --- choosing the store ------------------------------------------------------------------------


def test_store_urls_are_checked_and_chosen_flag_then_settings_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTERLEAVE_IMAGE_STORE", raising=False)
    assert Workspace.open(tmp_path).image_store_url == "file://"
    assert isinstance(Workspace.open(tmp_path).image_store, ImageStore)
    with pytest.raises(ConfigurationError, match="image store URL 's3://\\*\\*\\*@bucket' has an "
                                                 "unknown scheme 's3'"):
        Workspace.open(tmp_path, image_store="s3://key:secret@bucket")
    monkeypatch.setenv("INTERLEAVE_IMAGE_STORE", "postgresql://u@h/db")
    assert Workspace.open(tmp_path).image_store_url == "postgresql://u@h/db"
    assert Workspace.open(tmp_path, image_store="file://").image_store_url == "file://"
    settings = ModelSettings.model_construct(image_store="postgres://u@h/other")
    assert chosen_image_store(None, settings) == "postgres://u@h/other"
    assert chosen_image_store("file://", settings) == "file://"
    assert chosen_image_store(None, None) is None


async def test_a_file_store_elsewhere_keeps_the_images_in_that_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTERLEAVE_IMAGE_STORE", raising=False)
    shared = tmp_path / "shared-images"
    result = await arun("A kite. The wind.", profile="test", options=SMALL, run_dir=tmp_path / "runs",
                        image_store=f"file://{shared}")
    for ref in referenced_images(result.document):
        assert ImageStore(shared).read(ref)
    assert not (tmp_path / "runs" / "images").exists()
    assert shared in Workspace.open(tmp_path / "runs", image_store=f"file://{shared}").protected_paths()


def test_an_unreachable_database_is_a_configuration_error_without_the_password(tmp_path: Path) -> None:
    url = "postgresql://user:s3cret@127.0.0.1:1/db?connect_timeout=2"
    store = Workspace.open(tmp_path, "memory://x", url).image_store
    with pytest.raises(ConfigurationError) as caught:
        store.put(png((0, 0, 0)))
    assert "cannot connect to the PostgreSQL image store" in caught.value.message
    assert "s3cret" not in caught.value.message + caught.value.hint
    # A bad pool size is refused when the workspace opens, before anything connects.
    with pytest.raises(ConfigurationError, match="pool_max='0' in image store URL"):
        Workspace.open(tmp_path, "memory://x", "postgresql://h/db?pool_max=0")


# --- runs that share nothing but the database ----------------------------------------------------


async def test_the_ledger_is_shared_so_another_machine_draws_nothing_again(
    postgres_url: str, tmp_path: Path
) -> None:
    state = _state(RunOptions(width=32, height=32))
    first_machine = backends()
    context = Workspace.open(tmp_path / "a", "memory://x", postgres_url).context(first_machine)
    first = await generate_images(state, Runtime(context=context))
    # As if that worker died before its checkpoint: another one, with an empty run directory of
    # its own, runs the same node again.
    second_generator = RecordingGenerator()
    other = Workspace.open(tmp_path / "b", "memory://y", postgres_url).context(backends(second_generator))
    again = await generate_images(state, Runtime(context=other))
    assert second_generator.jobs == []
    assert [item.attempts[0].image for item in again["progress"]] == [
        item.attempts[0].image for item in first["progress"]]
    assert all(item.attempts[0].reused for item in again["progress"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_resume_and_export_with_nothing_shared_but_the_database(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.delenv("INTERLEAVE_RUN_DIR", raising=False)
    photo = tmp_path / "photo.png"
    photo.write_bytes(png((120, 80, 40), size=24))
    where = ["--checkpointer", postgres_url, "--image-store", postgres_url]
    cli = CliRunner()
    machine_a = tmp_path / "machine-a"
    first = cli.invoke(app, ["run", "--profile", "test", "--size", "40x40", "--review-plan",
                             "--thread", "shared", "--image", str(photo), "--run-dir",
                             str(machine_a), *where, "A cat wakes. It stretches. It eats."])
    assert first.exit_code == 0, first.stderr
    # The first machine kept no image, ledger record, verdict or checkpoint on its disk.
    assert not any(path.is_file() for top in ("images", "generations", "verdicts")
                   for path in (machine_a / top).rglob("*"))
    assert not (machine_a / "checkpoints.sqlite").exists()
    shutil.rmtree(machine_a)

    machine_b = tmp_path / "machine-b"
    done = cli.invoke(app, ["resume", "shared", "--accept-plan", "--run-dir", str(machine_b), *where])
    assert done.exit_code == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]).is_file()  # the page, from the database's images
    assert not (machine_b / "images").exists() and not (machine_b / "generations").exists()
    shutil.rmtree(machine_b)

    machine_c = tmp_path / "machine-c"
    out = machine_c / "story.md"
    exported = cli.invoke(app, ["export", "shared", "--format", "md", "-o", str(out),
                                "--run-dir", str(machine_c), *where])
    assert exported.exit_code == 0, exported.stderr
    document = asyncio.run(aload_document("shared", run_dir=machine_c, checkpointer=postgres_url))
    refs = referenced_images(document)
    assert len(document.request.images) == 1 and all(step.image for step in document.steps)
    for ref in refs:
        copy = out.parent / "story_files" / f"{ref.sha256}.png"
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == ref.sha256
    # The settings' environment variable works as the flag does.
    html = machine_c / "story.html"
    again = cli.invoke(app, ["export", "shared", "-o", str(html), "--run-dir", str(machine_c),
                             "--checkpointer", postgres_url],
                       env={"INTERLEAVE_IMAGE_STORE": postgres_url})
    assert again.exit_code == 0, again.stderr
    assert html.read_text().count("data:image/png;base64,") >= len(document.steps)
    # Without the store the images are not found (the run directory holds none).
    missing = cli.invoke(app, ["export", "shared", "-o", str(machine_c / "x.html"), "--run-dir",
                               str(machine_c), "--checkpointer", postgres_url, "--image-store", "file://"])
    assert missing.exit_code != 0 and "missing from the image store" in missing.stderr


@pytest.mark.slow
def test_sigkill_then_resume_on_another_machine_draws_nothing_twice(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    thread, kill_after = f"t-{uuid.uuid4().hex[:8]}", 3
    monkeypatch.delenv(DELAY_ENV, raising=False)
    clean_dir, clean_log = tmp_path / "clean", tmp_path / "clean.log"
    run_args = ("run", "--profile", "test", "--size", "96x96", "--thread", thread, REQUEST)
    _finish(_interleave(*run_args, run_dir=clean_dir, call_log=clean_log))
    clean_calls = _calls(clean_log)

    where = ("--checkpointer", postgres_url, "--image-store", postgres_url)
    machine_a, log = tmp_path / "machine-a", tmp_path / "crash.log"
    process = _interleave(*run_args, *where, run_dir=machine_a, call_log=log)
    deadline = time.monotonic() + 60
    while len(_calls(log)) < kill_after:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(DELAY / 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert len(_calls(log)) == kill_after
    # Whatever the killed worker wrote is in the database: its run directory holds none of it.
    assert not any(path.is_file() for path in machine_a.rglob("*") if "documents" not in path.parts)
    shutil.rmtree(machine_a, ignore_errors=True)

    machine_b = tmp_path / "machine-b"
    _finish(_interleave("resume", thread, *where, run_dir=machine_b, call_log=log))
    calls = _calls(log)
    repeated = [call for call, count in Counter(calls).items() if count > 1]
    assert repeated == [], f"finished generator calls were repeated: {repeated}"
    assert sorted(calls) == sorted(clean_calls)
    out = tmp_path / "doc.json"
    _finish(_interleave("export", thread, "--format", "json", "-o", str(out), *where,
                        run_dir=tmp_path / "machine-c", call_log=log))
    clean_out = tmp_path / "clean.json"
    _finish(_interleave("export", thread, "--format", "json", "-o", str(clean_out),
                        run_dir=clean_dir, call_log=clean_log))

    def images(path: Path) -> list[list[str]]:
        steps = json.loads(path.read_text())["document"]["steps"]
        return [[attempt["image"]["sha256"] for attempt in step["attempts"]] for step in steps]

    assert images(out) == images(clean_out)


# --- gc ------------------------------------------------------------------------------------------


async def test_gc_removes_unreferenced_rows_and_keeps_what_threads_use(
    postgres_url: str, tmp_path: Path
) -> None:
    where = {"run_dir": tmp_path / "runs", "checkpointer": postgres_url, "image_store": postgres_url}
    kept = await arun("A fox runs. It hides.", profile="test", options=SMALL, thread_id="kept", **where)
    stores = Workspace.open(**where).stores()
    # Left by a thread that was deleted, and by a run killed before any checkpoint named them.
    orphan = stores.images.put(png((250, 250, 0)))
    stores.ledger.record(generation_key(step=9), orphan, thread_id="deleted")
    stores.verdicts.record(verdict_key(step=9), Critique(success=True), thread_id="deleted")
    young = stores.images.put(png((0, 250, 250)))
    for table in ("interleave_images", "interleave_generations", "interleave_verdicts"):
        sql(postgres_url, f"UPDATE {table} SET touched_at = now() - interval '2 hours'")
    sql(postgres_url, f"UPDATE {IMAGES_TABLE} SET touched_at = now() WHERE sha256 = %s", (young.sha256,))

    dry = await acollect_garbage(**where)
    # The white canvas the critic compared step 1 with is named by no checkpoint (it is made
    # again when needed), as in a run directory.
    canvas = image_ref(png_image(Image.new("RGB", (SMALL.width, SMALL.height), "white")))
    assert sorted(str(item.path) for item in dry.orphan_images) == sorted(
        f"{IMAGES_TABLE}/{ref.sha256}" for ref in (orphan, canvas))
    assert len(dry.orphan_records) == 1 and len(dry.orphan_verdicts) == 1
    assert [str(item.path) for item in dry.young_images] == [f"{IMAGES_TABLE}/{young.sha256}"]
    assert dry.image_store == postgres_url  # shown without a password, had it one
    assert f"image store {postgres_url} (PostgreSQL)" in dry.summary()
    assert stores.images.contains(orphan)  # a dry run removes nothing

    removed = await acollect_garbage(delete=True, **where)
    assert len(removed.orphan_images) == 2 and len(removed.orphan_records) == 1
    assert not stores.images.contains(orphan) and stores.images.contains(young)
    assert stores.ledger.lookup(generation_key(step=9)) is None
    assert stores.verdicts.lookup(verdict_key(step=9)) is None
    for ref in referenced_images(kept.document):
        assert stores.images.read(ref)
    # The thread's own ledger records stay, so a resume still draws nothing.
    assert sql(postgres_url, "SELECT count(*) FROM interleave_generations WHERE thread_id = 'kept'") \
        == [(kept.document.generator_calls,)]
    # The CLI reports the same, as JSON; nothing is left to remove.
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["gc", "--json", "--run-dir", str(tmp_path / "runs"),
                                  "--checkpointer", postgres_url, "--image-store", postgres_url])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["would_remove"]["images"] == [] and report["images"]["referenced"] >= 1
    assert report["image_store"] == postgres_url


async def test_gc_refuses_a_checkpointer_that_names_none_of_the_stored_images(
    postgres_url: str, tmp_path: Path
) -> None:
    store = pg_store(postgres_url, tmp_path)
    store.put(png((3, 3, 3)))
    sql(postgres_url, f"UPDATE {IMAGES_TABLE} SET touched_at = now() - interval '2 hours'")
    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    sql_file = tmp_path / "empty.sqlite"
    from interleave_thinker.checkpoints.savers import open_checkpointer

    async with open_checkpointer(empty):
        pass
    assert sql_file.exists()
    with pytest.raises(GarbageCollectionRefused, match="every image of postgresql://"):
        await acollect_garbage(run_dir=tmp_path, checkpointer=empty, image_store=postgres_url, delete=True)
    assert sql(postgres_url, f"SELECT count(*) FROM {IMAGES_TABLE}") == [(1,)]
