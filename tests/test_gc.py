"""`interleave gc`: unused images and ledger records go, everything a thread can still reach stays."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from langgraph.types import Send
from PIL import Image
from typer.testing import CliRunner

from conftest import RecordingGenerator
from interleave_thinker import gc
from interleave_thinker.checkpoints.savers import open_checkpointer
from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.events import ImageReady, ProgressEvent
from interleave_thinker.gc import GarbageCollectionRefused, acollect_garbage, collect_garbage
from interleave_thinker.gc.references import collect_hashes
from interleave_thinker.inspect import aload_document, athread_report
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.render.export import referenced_images
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import Critique, ImageRef, RunOptions
from interleave_thinker.storage import atomic
from interleave_thinker.storage.image_store import ImageStore, encode_png
from interleave_thinker.storage.ledger import (
    GenerationLedger,
    LedgerRecord,
    generation_key,
    parse_record,
)
from interleave_thinker.workspace import Workspace

OLD = time.time() - 2 * 3600
OPTIONS = RunOptions(width=64, height=64)
KEEP_TEXT = "A cat sits on a mat. It jumps onto a shelf. It falls asleep. A dog barks."
GONE_TEXT = "A boat leaves the harbour. A storm rises. The boat comes home."
FORK_TEXT = "A tree in spring. The same tree in autumn."
PENDING_TEXT = "A fox runs through snow. It hides under a log."


class Crash(Exception):
    """Stands in for a kill: raised from the progress callback, it stops the run mid-node."""


def backends(generator: RecordingGenerator | None = None) -> Backends:
    return Backends(
        planner=StandInPlannerModel(),
        critic=StandInCriticModel(),
        generator=generator or RecordingGenerator(),
    )


def png(color: tuple[int, int, int]) -> bytes:
    return encode_png(Image.new("RGB", (8, 8), color))


def age(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (OLD, OLD), follow_symlinks=False)


def age_tree(root: Path, *, keep_young: frozenset[Path] | set[Path] = frozenset()) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path not in keep_young:
                age(path)


def store_files(run_dir: Path) -> set[Path]:
    """Every file and link under images/ and generations/."""
    found = set()
    for top in ("images", "generations"):
        for folder, dirs, names in os.walk(run_dir / top):
            found.update(Path(folder) / name for name in names)
            found.update(Path(folder) / name for name in dirs if (Path(folder) / name).is_symlink())
    return found


def records_by_thread(run_dir: Path) -> dict[str | None, set[Path]]:
    grouped: dict[str | None, set[Path]] = {}
    for path in (run_dir / "generations").glob("??/*.json"):
        grouped.setdefault(parse_record(path.read_bytes()).thread_id, set()).add(path)
    return grouped


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@dataclass
class Scene:
    """A run directory after real runs, a deleted thread, a fork, a crash and planted files."""

    run_dir: Path
    url: str
    keep: str
    gone: str
    fork: str
    pending: str
    store: ImageStore
    expected_images: set[Path] = field(default_factory=set)
    expected_records: set[Path] = field(default_factory=set)
    young: Path | None = None
    legacy_image: Path | None = None
    fork_originals: list[ImageRef] = field(default_factory=list)
    pending_images: set[str] = field(default_factory=set)
    left_alone: set[Path] = field(default_factory=set)
    outside: Path | None = None
    temp_file: Path | None = None


async def _swap_first_image(workspace: Workspace, thread: str, new: ImageRef) -> list[ImageRef]:
    """Replace the images of step 1's attempts with ``new`` in a new checkpoint, as a person
    editing the state would; the originals (returned, last first) stay only in older checkpoints."""
    config = {"configurable": {"thread_id": thread}}
    async with workspace.graph() as graph:
        values = (await graph.aget_state(config)).values
        # A finished thread keeps every attempt in its document only.
        document = values["document"]
        first = document.steps[0]
        originals = [attempt.image for attempt in reversed(first.attempts)]
        attempts = tuple(a.model_copy(update={"image": new}) for a in first.attempts)
        step = first.model_copy(update={"image": new, "attempts": attempts})
        document = document.model_copy(update={"steps": (step, *document.steps[1:])})
        await graph.aupdate_state(config, {"document": document}, as_node="compose")
    return originals


async def _latest_hashes(workspace: Workspace, thread: str) -> set[str]:
    found: set[str] = set()
    async with workspace.graph() as graph:
        collect_hashes((await graph.aget_state({"configurable": {"thread_id": thread}})).values, found)
    return found


async def build_scene(run_dir: Path, url: str, tag: str) -> Scene:
    scene = Scene(run_dir, url, f"keep-{tag}", f"gone-{tag}", f"fork-{tag}", f"pending-{tag}",
                  ImageStore(run_dir / "images"))
    common = {"options": OPTIONS, "run_dir": run_dir, "checkpointer": url}
    keep = await arun(KEEP_TEXT, backends=backends(), thread_id=scene.keep, **common)
    # Retries: some steps have two attempts, so two images each.
    assert any(len(step.attempts) > 1 for step in keep.document.steps)
    await arun(GONE_TEXT, backends=backends(), thread_id=scene.gone, **common)
    await arun(FORK_TEXT, backends=backends(), thread_id=scene.fork, **common)

    def crash(event: ProgressEvent) -> None:
        if isinstance(event, ImageReady):
            scene.pending_images.add(event.image)
            raise Crash

    with pytest.raises(Crash):
        await arun(PENDING_TEXT, backends=backends(), thread_id=scene.pending, on_event=crash, **common)
    workspace = Workspace.open(run_dir, url)
    # The crash hit before the generator's checkpoint: only the ledger names the image drawn.
    assert not (await _latest_hashes(workspace, scene.pending)) & scene.pending_images

    async with open_checkpointer(url) as saver:
        await saver.adelete_thread(scene.gone)

    store = scene.store
    ledger = GenerationLedger(run_dir / "generations", store)
    # The fork: step 1 now shows another image; the original is named only by old checkpoints
    # once the thread's ledger records are gone (records keep every image they name).
    swapped_in = store.put(png((1, 2, 3)))
    scene.fork_originals = await _swap_first_image(workspace, scene.fork, swapped_in)
    for path in records_by_thread(run_dir)[scene.fork]:
        path.unlink()
    assert not {ref.sha256 for ref in scene.fork_originals} & await _latest_hashes(workspace, scene.fork)

    # Planted: unused images, one young; records of a thread that never existed; a record in
    # the old layout (no thread); files the store never writes; a link; a killed write.
    unused = [store.put(png((200, 0, 0))), store.put(png((0, 200, 0)))]
    young = store.put(png((0, 0, 200)))
    stray = store.put(png((9, 9, 9)))
    ledger.record(generation_key(n=1), stray, thread_id="never-existed")
    ledger.record(generation_key(n=2), keep.document.steps[0].image, thread_id="never-existed")
    legacy = store.put(png((50, 50, 50)))
    legacy_record = ledger.root / generation_key(n=3)[:2] / f"{generation_key(n=3)}.json"
    legacy_record.parent.mkdir(parents=True, exist_ok=True)
    legacy_record.write_text(legacy.model_dump_json())
    notes = store.root / "ab" / "notes.txt"
    notes.parent.mkdir(parents=True, exist_ok=True)
    notes.write_text("not an image")
    outside = run_dir.parent / "outside.png"
    outside.write_bytes(png((7, 7, 7)))
    link = store.root / "cd" / f"cd{'0' * 62}.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    top_level = store.root / "README"
    top_level.write_text("mine")
    scene.temp_file = store.staging / f".tmp-{atomic.host_name()}-{dead_pid()}-k2j3.png"
    scene.temp_file.parent.mkdir(parents=True, exist_ok=True)
    scene.temp_file.write_bytes(b"half an image")

    scene.young = store.path_for(young)
    scene.legacy_image = store.path_for(legacy)
    scene.left_alone = {notes, link, top_level}
    scene.outside = outside
    age_tree(run_dir / "images", keep_young={scene.young})
    age_tree(run_dir / "generations")
    age(outside)

    # What a reader can reach, worked out from the documents and events, not by gc's rules.
    in_use = {legacy.sha256, *scene.pending_images, *(ref.sha256 for ref in scene.fork_originals)}
    for thread in (scene.keep, scene.fork):
        document = await aload_document(thread, run_dir=run_dir, checkpointer=url)
        in_use |= {ref.sha256 for ref in referenced_images(document)}
    stored = {path for path in (run_dir / "images").glob("??/*") if not path.is_symlink()} - {notes}
    scene.expected_images = {p for p in stored if p.name[:64] not in in_use} - {scene.young}
    assert {store.path_for(ref) for ref in (*unused, stray)} <= scene.expected_images
    records = records_by_thread(run_dir)
    scene.expected_records = records[scene.gone] | records["never-existed"]
    assert len(records[scene.gone]) >= 3
    return scene


@pytest.fixture
def scene(checkpointer_url: str, run_dir: Path) -> Scene:
    return asyncio.run(build_scene(run_dir, checkpointer_url, uuid.uuid4().hex[:12]))


def _export_all(cli: CliRunner, scene: Scene, thread: str, out: Path) -> None:
    for fmt in ("html", "md", "json"):
        target = out / f"{thread}.{fmt}"
        result = cli.invoke(app, ["export", thread, "--format", fmt, "-o", str(target),
                                  "--run-dir", str(scene.run_dir), "--checkpointer", scene.url])
        assert result.exit_code == 0, result.stderr
        assert target.stat().st_size > 0


def test_dry_run_lists_exactly_the_orphans_and_delete_removes_only_them(
    scene: Scene, tmp_path: Path
) -> None:
    where = {"run_dir": scene.run_dir, "checkpointer": scene.url}
    before = store_files(scene.run_dir)
    dry = collect_garbage(**where)
    assert {item.path for item in dry.orphan_images} == scene.expected_images
    assert {item.path for item in dry.orphan_records} == scene.expected_records
    assert [item.path for item in dry.young_images] == [scene.young]
    assert dry.records_without_thread == 1
    assert set(dry.unknown) == scene.left_alone
    assert store_files(scene.run_dir) == before

    done = collect_garbage(**where, delete=True)
    assert {item.path for item in done.orphan_images} == scene.expected_images
    assert {item.path for item in done.orphan_records} == scene.expected_records
    assert done.in_use == []
    assert store_files(scene.run_dir) == (
        before - scene.expected_images - scene.expected_records - {scene.temp_file}
    )
    assert scene.young is not None and scene.young.exists()
    assert scene.legacy_image is not None and scene.legacy_image.exists()
    assert all(scene.store.contains(ref) for ref in scene.fork_originals)
    assert scene.outside is not None and scene.outside.read_bytes() == png((7, 7, 7))
    # A second pass finds nothing left to remove.
    again = collect_garbage(**where, delete=True)
    assert again.orphan_images == [] and again.orphan_records == []

    # Every thread still loads, shows, exports and resumes, with no generator call for what
    # it had drawn.
    cli = CliRunner()
    for thread in (scene.keep, scene.fork):
        report = asyncio.run(athread_report(thread, **where))
        assert report["status"] == "done"
        _export_all(cli, scene, thread, tmp_path)
        generator = RecordingGenerator()
        asyncio.run(aresume(thread, backends=backends(generator), **where))
        assert generator.jobs == []
    generator = RecordingGenerator()
    resumed = asyncio.run(aresume(scene.pending, backends=backends(generator), **where))
    attempts = [a for step in resumed.document.steps for a in step.attempts]
    reused = [a for a in attempts if a.reused]
    assert {a.image.sha256 for a in reused} == scene.pending_images
    assert len(generator.jobs) == len(attempts) - len(reused)
    _export_all(cli, scene, scene.pending, tmp_path)


async def test_a_fork_from_an_old_checkpoint_still_finds_its_images(scene: Scene) -> None:
    await acollect_garbage(run_dir=scene.run_dir, checkpointer=scene.url, delete=True)
    workspace = Workspace.open(scene.run_dir, scene.url)
    config = {"configurable": {"thread_id": scene.fork}}
    async with workspace.graph() as graph:
        history = [snapshot async for snapshot in graph.aget_state_history(config)]
        old = next(s for s in history if s.values.get("document") is not None
                   and s.values["document"].steps[0].image == scene.fork_originals[0])
        # Time travel: continue from the checkpoint before the edit.
        await graph.aupdate_state(old.config, {"document": old.values["document"]}, as_node="compose")
        document = (await graph.aget_state(config)).values["document"]
    for ref in referenced_images(document):
        scene.store.read(ref)


async def test_unused_files_younger_than_the_minimum_age_are_kept(run_dir: Path) -> None:
    url = f"sqlite:///{run_dir}/checkpoints.sqlite"
    await arun(KEEP_TEXT, backends=backends(), options=OPTIONS, thread_id="t", run_dir=run_dir)
    store = ImageStore(run_dir / "images")
    fresh = store.put(png((1, 1, 1)))
    ledger = GenerationLedger(run_dir / "generations", store)
    ledger.record(generation_key(n=1), fresh, thread_id="not-yet-checkpointed")

    report = await acollect_garbage(run_dir=run_dir, checkpointer=url, delete=True)
    assert store.contains(fresh)
    assert report.orphan_images == [] and report.orphan_records == []
    # The young record keeps its image; the blank canvas the critic drew on is young too.
    assert [item.path.name[:64] for item in report.young_records] == [generation_key(n=1)]
    document = await aload_document("t", run_dir=run_dir)
    in_use = {ref.sha256 for ref in referenced_images(document)} | {fresh.sha256}
    unused = {path for path in (run_dir / "images").glob("??/*") if path.name[:64] not in in_use}
    assert len(unused) == 1 and {item.path for item in report.young_images} == unused
    assert "younger than 1h" in "\n".join(report.summary())

    # Two hours on, a ten-minute grace no longer protects them.
    age_tree(run_dir / "images")
    age_tree(run_dir / "generations")
    later = await acollect_garbage(run_dir=run_dir, delete=True, min_age_s=600)
    assert store.path_for(fresh) in {item.path for item in later.orphan_images}
    assert not store.contains(fresh)


async def test_a_file_stored_again_while_gc_removes_it_is_put_back(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await arun(KEEP_TEXT, backends=backends(), options=OPTIONS, thread_id="t", run_dir=run_dir)
    store = ImageStore(run_dir / "images")
    data = png((3, 3, 3))
    ref = store.put(data)
    age_tree(run_dir / "images")
    scan = gc.collect._scan

    def scan_then_a_run_stores_it(*args: object) -> None:
        scan(*args)  # type: ignore[arg-type]
        # Between gc's scan and its removal a run stores the same image (an input, say).
        assert store.put(data) == ref

    monkeypatch.setattr(gc.collect, "_scan", scan_then_a_run_stores_it)
    report = await acollect_garbage(run_dir=run_dir, delete=True)
    assert [item.path for item in report.in_use] == [store.path_for(ref)]
    assert store.read(ref) == data
    assert list(store.root.glob("??/.tmp-*")) == []


def test_put_and_a_ledger_hit_refresh_the_time_of_what_they_reuse(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    ledger = GenerationLedger(tmp_path / "generations", store)
    ref = store.put(png((4, 4, 4)))
    key = generation_key(n=1)
    ledger.record(key, ref, thread_id="t")
    record = ledger.root / key[:2] / f"{key}.json"
    age(store.path_for(ref), record)
    store.put(png((4, 4, 4)))
    assert store.path_for(ref).stat().st_mtime > OLD + 3000
    age(store.path_for(ref))
    assert ledger.lookup(key) == ref
    assert store.path_for(ref).stat().st_mtime > OLD + 3000
    assert record.stat().st_mtime > OLD + 3000


def test_ledger_records_name_their_thread_and_old_records_still_read(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    ledger = GenerationLedger(tmp_path / "generations", store)
    ref = store.put(png((5, 5, 5)))
    ledger.record(generation_key(n=1), ref, thread_id="t-1")
    path = ledger.root / generation_key(n=1)[:2] / f"{generation_key(n=1)}.json"
    assert json.loads(path.read_text()) == {"thread_id": "t-1", "image": ref.model_dump()}
    assert parse_record(path.read_bytes()) == LedgerRecord(thread_id="t-1", image=ref)
    # Records written before the thread was stored: a bare ImageRef.
    path.write_text(ref.model_dump_json())
    assert parse_record(path.read_bytes()) == LedgerRecord(thread_id=None, image=ref)
    assert ledger.lookup(generation_key(n=1)) == ref


async def _one_run(run_dir: Path, thread: str = "t", text: str = KEEP_TEXT) -> None:
    await arun(text, backends=backends(), options=OPTIONS, thread_id=thread, run_dir=run_dir)
    age_tree(run_dir / "images")
    age_tree(run_dir / "generations")


async def test_an_empty_or_missing_or_other_checkpointer_makes_gc_refuse(
    run_dir: Path, tmp_path: Path
) -> None:
    await _one_run(run_dir)
    before = store_files(run_dir)
    missing = tmp_path / "nowhere" / "checkpoints.sqlite"
    with pytest.raises(GarbageCollectionRefused, match="no checkpoint database") as caught:
        await acollect_garbage(run_dir=run_dir, checkpointer=f"sqlite:///{missing}", delete=True)
    assert "--checkpointer" in caught.value.hint
    assert not missing.parent.exists()

    empty = f"sqlite:///{tmp_path}/empty.sqlite"
    async with open_checkpointer(empty):
        pass
    with pytest.raises(GarbageCollectionRefused, match="0 threads") as caught:
        await acollect_garbage(run_dir=run_dir, checkpointer=empty, delete=True)
    assert "wrong database" in caught.value.hint and "--allow-empty" in caught.value.hint
    # A dry run refuses as well: its listing would say "everything".
    with pytest.raises(GarbageCollectionRefused):
        await acollect_garbage(run_dir=run_dir, checkpointer=empty)

    other_dir = tmp_path / "other"
    await _one_run(other_dir, "elsewhere", GONE_TEXT)
    other = f"sqlite:///{other_dir}/checkpoints.sqlite"
    with pytest.raises(GarbageCollectionRefused, match="none of which uses any of the"):
        await acollect_garbage(run_dir=run_dir, checkpointer=other, delete=True)
    assert store_files(run_dir) == before

    # Told that every thread really was deleted, it removes everything unused.
    report = await acollect_garbage(run_dir=run_dir, checkpointer=empty, delete=True,
                                    allow_empty=True)
    assert report.orphan_images and not list((run_dir / "images").glob("??/*.png"))


async def test_a_postgres_checkpointer_without_these_threads_makes_gc_refuse(
    run_dir: Path, postgres_url: str
) -> None:
    await _one_run(run_dir)
    before = store_files(run_dir)
    # The shared test database holds no thread of this run directory (or none at all).
    with pytest.raises(GarbageCollectionRefused, match=r"0 threads|none of which uses any"):
        await acollect_garbage(run_dir=run_dir, checkpointer=postgres_url, delete=True)
    assert store_files(run_dir) == before


async def test_an_unreadable_checkpoint_makes_gc_refuse(run_dir: Path) -> None:
    import sqlite3

    await _one_run(run_dir)
    before = store_files(run_dir)
    database = run_dir / "checkpoints.sqlite"
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE checkpoints SET checkpoint = x'c1c1c1' WHERE rowid = "
                     "(SELECT min(rowid) FROM checkpoints)")
    with pytest.raises(GarbageCollectionRefused, match="cannot read the checkpoints"):
        await acollect_garbage(run_dir=run_dir, delete=True)
    assert store_files(run_dir) == before

    database.write_bytes(b"this is not a database" * 100)
    for extra in ("-wal", "-shm"):
        database.with_name(database.name + extra).unlink(missing_ok=True)
    with pytest.raises(GarbageCollectionRefused, match="cannot read the checkpoints"):
        await acollect_garbage(run_dir=run_dir, delete=True)
    assert store_files(run_dir) == before


async def test_a_linked_image_folder_is_not_followed(run_dir: Path, tmp_path: Path) -> None:
    await _one_run(run_dir)
    elsewhere = tmp_path / "elsewhere"
    (run_dir / "images").rename(elsewhere)
    (run_dir / "images").symlink_to(elsewhere)
    before = {path: path.read_bytes() for path in elsewhere.rglob("*") if path.is_file()}
    report = await acollect_garbage(run_dir=run_dir, delete=True)
    assert report.images == 0 and report.unknown == [run_dir / "images"]
    assert {path: path.read_bytes() for path in elsewhere.rglob("*") if path.is_file()} == before


def test_hashes_are_found_in_every_kind_of_value() -> None:
    refs = [ImageRef(sha256=f"{n:x}" * 64, media_type="image/png", width=1, height=1)
            for n in range(1, 8)]

    @dataclass
    class Holder:
        value: object

    class Slotted:
        __slots__ = ("value",)

        def __init__(self, value: object) -> None:
            self.value = value

    nested = {
        "record": refs[0],
        "tuple": ({"list": [Critique(success=True, reasoning=refs[1].sha256)]},),
        "send": Send("node", {"ref": refs[2]}),
        "dataclass": Holder(refs[3]),
        "slots": Slotted(refs[4]),
        "error": ValueError("failed", refs[5]),
        "block": {"type": "image", "file_id": f"sha256:{refs[6].sha256}"},
        "bytes": refs[0].sha256.replace("1", "9").encode(),
        "not a hash": "f" * 63,
    }
    nested["cycle"] = nested
    found: set[str] = set()
    collect_hashes(nested, found)
    assert found == {ref.sha256 for ref in refs}


@pytest.mark.parametrize(("text", "seconds"), [("0", 0), ("90", 90), ("90s", 90), ("30m", 1800),
                                               ("1h", 3600), ("1.5H", 5400), ("2d", 172800)])
def test_durations(text: str, seconds: float) -> None:
    assert gc.parse_duration(text) == seconds


def test_cli_gc_is_a_dry_run_unless_told_to_delete(run_dir: Path, tmp_path: Path) -> None:
    asyncio.run(_one_run(run_dir))
    store = ImageStore(run_dir / "images")
    orphan = store.put(png((8, 8, 8)))
    age(store.path_for(orphan))
    cli = CliRunner()
    base = ["gc", "--run-dir", str(run_dir)]

    result = cli.invoke(app, base)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("dry run: nothing was removed")
    assert "would remove 2 unused images" in result.stdout  # the orphan and the blank canvas
    assert store.contains(orphan)

    result = cli.invoke(app, [*base, "--json"])
    report = json.loads(result.stdout)
    assert report["mode"] == "dry-run" and report["threads"] == 1
    assert str(store.path_for(orphan)) in report["would_remove"]["images"]

    result = cli.invoke(app, [*base, "--delete", "-v"])
    assert result.exit_code == 0, result.stderr
    assert "dry run" not in result.stdout and "removed 2 unused images" in result.stdout
    assert str(store.path_for(orphan)) in result.stdout
    assert not store.contains(orphan)

    result = cli.invoke(app, [*base, "--checkpointer", f"sqlite:///{tmp_path}/none.sqlite"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no checkpoint database")
    assert "hint: " in result.stderr

    result = cli.invoke(app, [*base, "--min-age", "soon"])
    assert result.exit_code == 1 and "'soon' is not a duration" in result.stderr


def test_the_blocking_api_matches_the_cli(run_dir: Path) -> None:
    asyncio.run(_one_run(run_dir))
    report = collect_garbage(run_dir=run_dir)
    assert not report.delete and report.threads == 1 and report.images >= 1
    assert report.as_json()["images"]["stored"] == report.images


def test_images_in_a_fresh_run_directory_are_never_removed(run_dir: Path) -> None:
    data = io.BytesIO()
    Image.new("RGB", (4, 4)).save(data, format="PNG")
    ImageStore(run_dir / "images").put(data.getvalue())
    asyncio.run(arun("One step.", backends=backends(), options=OPTIONS, thread_id="t", run_dir=run_dir))
    report = collect_garbage(run_dir=run_dir, delete=True)
    assert report.orphan_images == [] and len(report.young_images) >= 1
