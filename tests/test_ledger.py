"""The generation ledger: deterministic keys, and lookups that only trust intact images."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from interleave_thinker.state import ImageRef
from interleave_thinker.storage.image_store import ImageStore
from interleave_thinker.storage.ledger import GenerationLedger, generation_key

FIELDS: dict[str, object] = {
    "thread": "t-1",
    "step": 2,
    "attempt": 1,
    "prompt": "a red fox in the snow",
    "seed": 7,
    "width": 64,
    "height": 64,
    "sources": ["step:1"],
    "generator": "test",
}


def png(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


@pytest.fixture
def ledger(tmp_path: Path, store: ImageStore) -> GenerationLedger:
    return GenerationLedger(tmp_path / "ledger", store)


def test_generation_key_is_a_deterministic_sha256() -> None:
    key = generation_key(**FIELDS)
    assert len(key) == 64
    assert set(key) <= set("0123456789abcdef")
    assert generation_key(**FIELDS) == key
    # Keyword order does not matter.
    assert generation_key(**dict(reversed(list(FIELDS.items())))) == key


def test_generation_key_is_sha256_of_canonical_json() -> None:
    # Keys are stored on disk: changing how they are computed orphans every ledger entry.
    expected = hashlib.sha256(b'{"prompt":"x","seed":1,"sources":["step:1"]}').hexdigest()
    assert generation_key(seed=1, sources=("step:1",), prompt="x") == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("thread", "t-2"),
        ("step", 3),
        ("attempt", 2),
        ("prompt", "a red fox in the snow."),
        ("seed", 8),
        ("width", 65),
        ("height", 63),
        ("sources", ["step:2"]),
        ("sources", []),
        ("generator", "other"),
        ("seed", "7"),
    ],
)
def test_generation_key_changes_with_any_field(name: str, value: object) -> None:
    assert generation_key(**{**FIELDS, name: value}) != generation_key(**FIELDS)


def test_generation_key_changes_when_a_field_is_added_or_removed() -> None:
    base = generation_key(**FIELDS)
    assert generation_key(**FIELDS, extra=None) != base
    without = {k: v for k, v in FIELDS.items() if k != "seed"}
    assert generation_key(**without) != base


def test_record_then_lookup_returns_the_ref(ledger: GenerationLedger, store: ImageStore) -> None:
    key = generation_key(**FIELDS)
    ref = store.put(png())
    ledger.record(key, ref)
    assert ledger.lookup(key) == ref
    assert (ledger.root / key[:2] / f"{key}.json").is_file()
    # A fresh ledger on the same directories sees the record (it survives a restart).
    assert GenerationLedger(ledger.root, ImageStore(store.root)).lookup(key) == ref


def test_record_overwrites_an_earlier_entry(ledger: GenerationLedger, store: ImageStore) -> None:
    key = generation_key(**FIELDS)
    ledger.record(key, store.put(png("red")))
    blue = store.put(png("blue"))
    ledger.record(key, blue)
    assert ledger.lookup(key) == blue


def test_unknown_key_is_none(ledger: GenerationLedger, store: ImageStore) -> None:
    ledger.record(generation_key(**FIELDS), store.put(png()))
    assert ledger.lookup(generation_key(**{**FIELDS, "seed": 99})) is None


def test_deleted_image_is_none(ledger: GenerationLedger, store: ImageStore) -> None:
    key = generation_key(**FIELDS)
    ref = store.put(png())
    ledger.record(key, ref)
    store.path_for(ref).unlink()
    assert ledger.lookup(key) is None


def test_damaged_image_is_none(ledger: GenerationLedger, store: ImageStore) -> None:
    key = generation_key(**FIELDS)
    ref = store.put(png())
    ledger.record(key, ref)
    store.path_for(ref).write_bytes(png("green"))
    assert ledger.lookup(key) is None


def test_image_never_stored_is_none(ledger: GenerationLedger) -> None:
    key = generation_key(**FIELDS)
    ledger.record(key, ImageRef(sha256="b" * 64, media_type="image/png", width=4, height=4))
    assert ledger.lookup(key) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"sha256": "',
        b"[]",
        b'{"sha256": "../../etc/passwd", "media_type": "image/png", "width": 4, "height": 4}',
        b'{"sha256": "' + b"a" * 64 + b'", "media_type": "image/gif", "width": 4, "height": 4}',
        b"\xff\xfe\x00garbage",
    ],
    ids=["empty", "bad-json", "truncated", "wrong-type", "path-digest", "bad-media", "binary"],
)
def test_damaged_ledger_file_is_none(
    ledger: GenerationLedger, store: ImageStore, content: bytes
) -> None:
    key = generation_key(**FIELDS)
    ledger.record(key, store.put(png()))
    (ledger.root / key[:2] / f"{key}.json").write_bytes(content)
    assert ledger.lookup(key) is None


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "z" * 64, "", "../" + "a" * 61],
)
def test_key_that_is_not_a_sha256_is_refused(
    ledger: GenerationLedger, store: ImageStore, key: str
) -> None:
    ref = store.put(png())
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        ledger.lookup(key)
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        ledger.record(key, ref)
    assert not ledger.root.exists()


def test_images_are_synced_before_their_rename_and_records_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image must be on disk before any checkpoint names it; a ledger or verdict record only
    saves work (one a power cut loses, or leaves empty, reads as never written: see
    test_damaged_ledger_file_is_none), so it is written atomically but not synced."""
    import os

    from interleave_thinker.state import Critique
    from interleave_thinker.storage import atomic
    from interleave_thinker.storage.verdicts import VerdictLedger, verdict_key

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", recording_fsync)
    store = ImageStore(tmp_path / "images")
    ledger = GenerationLedger(tmp_path / "generations", store)
    verdicts = VerdictLedger(tmp_path / "verdicts")
    ref = store.put(png("blue"))
    # The image's bytes (in the staging folder, before the rename) and then its folder.
    data, folder = (Path(path) for path in synced)
    assert (data.parent.name, folder) == (".incoming", store.path_for(ref).parent)
    synced.clear()
    key = generation_key(**FIELDS)
    ledger.record(key, ref, thread_id="t-1")
    question = verdict_key(thread="t-1", step=1, attempt=1)
    verdicts.record(question, Critique(success=True), thread_id="t-1")
    assert synced == []
    assert ledger.lookup(key) == ref
    record = verdicts.lookup(question)
    assert record is not None and record.critique.success
