"""Images, generation ledger and critic verdicts in PostgreSQL: all that workers on several machines share.

``--image-store postgresql://...`` keeps in one database what a run directory would otherwise
hold on a file system: the images (content-addressed, verified on read), the generation ledger
and the verdict records. Three tables, created on first use:

- ``interleave_images(sha256, media_type, width, height, data, created_at, touched_at)``
- ``interleave_generations(key, thread_id, sha256, record, created_at, touched_at)``
- ``interleave_verdicts(key, thread_id, record, created_at, touched_at)``

Every write is one autocommitted statement: when ``put_checked`` or ``record`` returns, the row
is committed, so a checkpoint written afterwards never names a row that a crash could lose.
Writes are idempotent (``INSERT ... ON CONFLICT DO UPDATE``), so two workers storing the same
image at once both succeed with one row. ``touched_at`` is set on every store and lookup:
``interleave gc`` keeps unreferenced rows younger than ``--min-age``.

The calls are synchronous (psycopg over a small connection pool per database and process):
the graph's nodes already call the stores from worker threads.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from interleave_thinker.checkpoints.postgres import (
    DEFAULT_CONNECT_TIMEOUT_S,
    INSTALL_HINT,
    URL_HINT,
    PostgresTarget,
    _scrub,
    mask_password,
    parse_url,
)
from interleave_thinker.errors import ConfigurationError, ImageError, StorageError, one_line
from interleave_thinker.state import SHA256_PATTERN, Critique, ImageRef
from interleave_thinker.storage.image_store import CheckedImage, ImageStorage, image_ref
from interleave_thinker.storage.ledger import LedgerRecord, is_generation_key, parse_record
from interleave_thinker.storage.verdicts import VerdictRecord, is_verdict_key, parse_verdict_record

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg_pool import ConnectionPool

__all__ = [
    "GENERATIONS_TABLE",
    "IMAGES_TABLE",
    "VERDICTS_TABLE",
    "PostgresDatabase",
    "PostgresGenerationLedger",
    "PostgresImageStore",
    "PostgresVerdictLedger",
    "StoredRow",
    "check_url",
    "close_databases",
    "postgres_database",
]

T = TypeVar("T")

IMAGES_TABLE = "interleave_images"
GENERATIONS_TABLE = "interleave_generations"
VERDICTS_TABLE = "interleave_verdicts"
# Any fixed 64-bit number serves, as long as every process uses the same one (the checkpoint
# tables' setup uses ...0001).
SETUP_LOCK_KEY = 0x1A7E_41EA_5E70_0002
# How long a store call waits for a free connection of the pool before it fails.
POOL_WAIT_S = 60.0
APPLICATION_NAME = "interleave-image-store"
# gc lists the tables in pages of this many rows.
PAGE_ROWS = 5000

_TABLES = (
    f"""CREATE TABLE IF NOT EXISTS {IMAGES_TABLE} (
        sha256 text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{{64}}$'),
        media_type text NOT NULL,
        width integer NOT NULL,
        height integer NOT NULL,
        data bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        touched_at timestamptz NOT NULL DEFAULT now()
    )""",
    f"""CREATE TABLE IF NOT EXISTS {GENERATIONS_TABLE} (
        key text PRIMARY KEY CHECK (key ~ '^[0-9a-f]{{64}}$'),
        thread_id text,
        sha256 text NOT NULL,
        record text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        touched_at timestamptz NOT NULL DEFAULT now()
    )""",
    f"""CREATE TABLE IF NOT EXISTS {VERDICTS_TABLE} (
        key text PRIMARY KEY CHECK (key ~ '^[0-9a-f]{{64}}$'),
        thread_id text,
        record text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        touched_at timestamptz NOT NULL DEFAULT now()
    )""",
)
# PNG, JPEG and WebP are compressed already: PostgreSQL would try to compress them again.
_IMAGES_UNCOMPRESSED = f"ALTER TABLE {IMAGES_TABLE} ALTER COLUMN data SET STORAGE EXTERNAL"
_ALL_PRESENT = (
    f"SELECT to_regclass('{IMAGES_TABLE}') IS NOT NULL AND to_regclass('{GENERATIONS_TABLE}') IS NOT NULL"
    f" AND to_regclass('{VERDICTS_TABLE}') IS NOT NULL"
)

# An image stored again is only touched; a row whose bytes were damaged is repaired by the store.
_PUT_IMAGE = f"""
    INSERT INTO {IMAGES_TABLE} AS stored (sha256, media_type, width, height, data)
    VALUES (%s, %s, %s, %s, %s)
    ON CONFLICT (sha256) DO UPDATE SET
        touched_at = now(),
        media_type = EXCLUDED.media_type,
        width = EXCLUDED.width,
        height = EXCLUDED.height,
        data = CASE WHEN encode(sha256(stored.data), 'hex') = EXCLUDED.sha256
                    THEN stored.data ELSE EXCLUDED.data END
"""
_PUT_GENERATION = f"""
    INSERT INTO {GENERATIONS_TABLE} (key, thread_id, sha256, record) VALUES (%s, %s, %s, %s)
    ON CONFLICT (key) DO UPDATE SET
        thread_id = EXCLUDED.thread_id, sha256 = EXCLUDED.sha256, record = EXCLUDED.record,
        touched_at = now()
"""
_PUT_VERDICT = f"""
    INSERT INTO {VERDICTS_TABLE} (key, thread_id, record) VALUES (%s, %s, %s)
    ON CONFLICT (key) DO UPDATE SET
        thread_id = EXCLUDED.thread_id, record = EXCLUDED.record, touched_at = now()
"""

# The databases of this process by URL: each opens its pool (and sets up its tables) on first use.
_DATABASES: dict[str, PostgresDatabase] = {}
_DATABASES_LOCK = threading.Lock()


def check_url(url: str) -> PostgresTarget:
    """The connection string and pool sizes of an image store URL; ConfigurationError if bad."""
    try:
        return parse_url(url)
    except ConfigurationError as exc:
        # parse_url words its errors for the checkpointer, whose URLs it was written for.
        raise ConfigurationError(
            exc.message.replace("checkpointer URL", "image store URL"), hint=exc.hint
        ) from exc


@dataclass(frozen=True)
class StoredRow:
    """A row gc found: its key (an image's sha256, a ledger or verdict key), size and last use."""

    key: str
    size: int
    touched: float
    thread_id: str | None = None
    sha256: str | None = None


class PostgresDatabase:
    """One database of this process: a pool of synchronous connections, its tables set up once.

    Opened on first use (from a worker thread, never at construction), shared by every store
    of the same URL, closed at exit. A storage fault becomes a StorageError that names the
    database without its password; a dropped connection is retried once, since every
    statement here is idempotent.
    """

    def __init__(self, url: str) -> None:
        self.target = check_url(url)
        self.url = url
        self.shown = mask_password(url)
        self._pool: ConnectionPool[Any] | None = None
        self._lock = threading.Lock()

    @property
    def location(self) -> str:
        return f"the PostgreSQL image store {self.shown}"

    # -- connections ----------------------------------------------------------------------------

    def _open(self) -> ConnectionPool[Any]:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise ConfigurationError(
                f"a PostgreSQL image store needs psycopg and psycopg_pool ({exc})", hint=INSTALL_HINT
            ) from exc
        from psycopg.conninfo import conninfo_to_dict

        kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}
        try:
            given = conninfo_to_dict(self.target.conninfo)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(
                f"image store URL {self.shown!r} is not a valid PostgreSQL URL: {self._text(exc)}",
                hint=URL_HINT + "; libpq parameters such as ?sslmode=require may follow",
            ) from exc
        if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in os.environ:
            kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
        if "application_name" not in given and "PGAPPNAME" not in os.environ:
            # What pg_stat_activity shows for these connections.
            kwargs["application_name"] = APPLICATION_NAME
        try:
            # One plain connection first: it reports a refused connection or a missing database
            # as libpq words it (a pool would only time out), and it creates the tables.
            with psycopg.connect(self.target.conninfo, **kwargs) as conn:
                _create_tables(conn)
        except psycopg.OperationalError as exc:
            raise ConfigurationError(
                f"cannot connect to {self.location}: {self._text(exc)}",
                hint="check that the server runs and the database exists (createdb NAME); " + URL_HINT,
            ) from exc
        except psycopg.Error as exc:
            raise ConfigurationError(
                f"cannot use {self.location}: {self._text(exc)}",
                hint="the user needs rights to create tables in the database; " + URL_HINT,
            ) from exc
        pool: ConnectionPool[Any] = ConnectionPool(
            self.target.conninfo,
            min_size=self.target.pool_min,
            max_size=self.target.pool_max,
            kwargs=kwargs,
            configure=_durable_commits,
            open=False,
            # A connection dropped while idle (server restart, idle timeout) is replaced, not used.
            check=ConnectionPool.check_connection,
            timeout=POOL_WAIT_S,
            name="interleave-images",
        )
        try:
            pool.open(wait=True, timeout=DEFAULT_CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            pool.close()
            raise ConfigurationError(
                f"cannot open a connection pool to {self.location}: {self._text(exc)}",
                hint="check the server's max_connections, or lower pool_min in the URL",
            ) from exc
        return pool

    def pool(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._pool is None:
                self._pool = self._open()
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def run(self, work: Callable[[Connection[Any]], T]) -> T:
        """``work`` on a pooled connection; storage faults as StorageError, one retry if the
        connection was lost (every statement of this module can run twice)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        for attempt in (1, 2):
            try:
                with self.pool().connection() as conn:
                    return work(conn)
            except PoolTimeout as exc:
                raise StorageError(
                    f"no connection to {self.location} came free in time ({self._text(exc)})",
                    hint="the server may be down, restarting or out of connections (max_connections; "
                    "the URL's pool_max sets this process's share): check it, then run the command "
                    "again; images stored before are kept",
                ) from exc
            except psycopg.OperationalError as exc:
                if attempt == 1 and getattr(exc, "sqlstate", None) != "53100":
                    continue
                raise self._fault(exc) from exc
            except psycopg.Error as exc:
                raise self._fault(exc) from exc
        raise AssertionError("unreachable")

    def _text(self, exc: BaseException) -> str:
        return _scrub(one_line(exc), self.url)

    def _fault(self, exc: Exception) -> StorageError:
        import psycopg

        text = self._text(exc)
        again = "then run the command again (`interleave resume THREAD` continues a thread); " \
            "images stored before are kept"
        if getattr(exc, "sqlstate", None) == "53100":  # disk_full
            return StorageError(
                f"the PostgreSQL server of {self.location} is out of disk space ({text})",
                hint=f"free space on the database server, {again}",
            )
        if isinstance(exc, psycopg.OperationalError):
            return StorageError(
                f"lost the connection to {self.location}: {text}",
                hint=f"check that the server runs (it may have restarted), {again}",
            )
        return StorageError(f"{self.location} failed: {text}", hint=f"once the cause is fixed, {again}")

    # -- gc hooks -------------------------------------------------------------------------------

    def now(self) -> float:
        """The database's clock (seconds since the epoch): ``touched_at`` is on this clock."""
        return self.run(lambda conn: float(_one(conn, "SELECT extract(epoch FROM now())")))

    def rows(self, table: str) -> Iterator[StoredRow]:
        """Every row of one of the three tables, by key, read a page at a time."""
        key, extra = {
            IMAGES_TABLE: ("sha256", "octet_length(data), NULL, NULL"),
            GENERATIONS_TABLE: ("key", "octet_length(record), thread_id, sha256"),
            VERDICTS_TABLE: ("key", "octet_length(record), thread_id, NULL"),
        }[table]
        query = (
            f"SELECT {key}, {extra}, extract(epoch FROM touched_at) FROM {table} "
            f"WHERE {key} > %s ORDER BY {key} LIMIT {PAGE_ROWS}"
        )
        after = ""
        while True:
            page = self.run(lambda conn, after=after: conn.execute(query, (after,)).fetchall())
            for name, size, thread_id, sha256, touched in page:
                yield StoredRow(name, int(size), float(touched), thread_id, sha256)
            if len(page) < PAGE_ROWS:
                return
            after = page[-1][0]

    def delete_if_older(self, table: str, key: str, cutoff: float) -> bool:
        """Remove the row ``key`` of ``table`` unless it was stored or used since ``cutoff``.

        One statement: a run that stores the same image again either touched it first (then
        it stays) or waits for the delete and inserts it anew.
        """
        column = "sha256" if table == IMAGES_TABLE else "key"
        query = f"DELETE FROM {table} WHERE {column} = %s AND touched_at < to_timestamp(%s)"
        return self.run(lambda conn: conn.execute(query, (key, cutoff)).rowcount) > 0


def _one(conn: Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def _create_tables(conn: Connection[Any]) -> None:
    """Create the three tables, one process at a time (CREATE TABLE IF NOT EXISTS can race)."""
    if _one(conn, _ALL_PRESENT):
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK_KEY,))
        new_images = _one(conn, f"SELECT to_regclass('{IMAGES_TABLE}') IS NULL")
        for statement in _TABLES:
            conn.execute(statement)
        if new_images:
            conn.execute(_IMAGES_UNCOMPRESSED)


def _durable_commits(conn: Connection[Any]) -> None:
    """A commit must be on disk when it returns: a checkpoint written next names the row."""
    if _one(conn, "SHOW synchronous_commit") == "off":
        conn.execute("SET synchronous_commit = on")


def postgres_database(url: str) -> PostgresDatabase:
    """The process's database object for ``url`` (checked now, connected on first use)."""
    with _DATABASES_LOCK:
        database = _DATABASES.get(url)
        if database is None:
            database = _DATABASES[url] = PostgresDatabase(url)
        return database


def close_databases() -> None:
    """Close every pool this process opened (at exit; tests call it between cases). A store
    used afterwards opens its database's pool again."""
    with _DATABASES_LOCK:
        databases = list(_DATABASES.values())
    for database in databases:
        database.close()


def _forget_after_fork() -> None:
    # A forked child must not use its parent's connections: it opens its own.
    _DATABASES.clear()


atexit.register(close_databases)
os.register_at_fork(after_in_child=_forget_after_fork)


class PostgresImageStore(ImageStorage):
    """Images by sha256 in ``interleave_images``: committed when stored, verified when read."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database

    @property
    def location(self) -> str:
        return self.database.location

    def put_checked(self, image: CheckedImage) -> ImageRef:
        ref = image_ref(image)
        params = (ref.sha256, ref.media_type, ref.width, ref.height, image.data)
        derived = self.deriving(image)
        self.database.run(lambda conn: conn.execute(_PUT_IMAGE, params))
        return self.stored(ref, image, derived)

    def read(self, ref: ImageRef) -> bytes:
        query = f"SELECT data FROM {IMAGES_TABLE} WHERE sha256 = %s"
        data = self.database.run(lambda conn: _one(conn, query, (ref.sha256,)))
        if data is None:
            raise ImageError(
                f"image {ref.short} is missing from {self.location}",
                hint="--image-store may name another database than the runs used, or gc removed it",
            )
        data = bytes(data)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ImageError(
                f"image {ref.short} in {self.location} does not match its hash: the row was "
                "changed or damaged",
                hint="restore the database from a backup or rerun the thread (storing the image "
                "again repairs the row)",
            )
        return data

    def find(self, sha256: str) -> ImageRef:
        if not isinstance(sha256, str) or not SHA256_PATTERN.fullmatch(sha256):
            raise ImageError(
                f"{sha256!r} is not an image hash", hint="give the 64-hex sha256 of a stored image"
            )
        query = f"SELECT media_type, width, height FROM {IMAGES_TABLE} WHERE sha256 = %s"
        row = self.database.run(lambda conn: conn.execute(query, (sha256,)).fetchone())
        if row is None:
            raise ImageError(
                f"no image {sha256[:12]} in {self.location}",
                hint="pass the hash of an image this store produced",
            )
        try:
            return ImageRef(sha256=sha256, media_type=row[0], width=row[1], height=row[2])
        except ValidationError as exc:
            raise ImageError(
                f"image {sha256[:12]} in {self.location} has a damaged row ({one_line(exc)})",
                hint="restore the database from a backup or rerun the thread",
            ) from exc

    def contains(self, ref: ImageRef) -> bool:
        query = f"SELECT encode(sha256(data), 'hex') = sha256 FROM {IMAGES_TABLE} WHERE sha256 = %s"
        return bool(self.database.run(lambda conn: _one(conn, query, (ref.sha256,))))

    def touch(self, ref: ImageRef) -> bool:
        query = f"UPDATE {IMAGES_TABLE} SET touched_at = now() WHERE sha256 = %s"
        return self.database.run(lambda conn: conn.execute(query, (ref.sha256,)).rowcount) > 0


class PostgresGenerationLedger:
    """The generation ledger (see ``storage.ledger.GenerationLedger``) in ``interleave_generations``."""

    def __init__(self, database: PostgresDatabase, store: ImageStorage) -> None:
        self.database = database
        self.store = store

    def sweep_abandoned_writes(self) -> list[Path]:
        return []  # a statement commits whole or not at all

    def lookup(self, key: str) -> ImageRef | None:
        """The image recorded for ``key``, or None if none is (or its image is gone or damaged)."""
        _check_key(key, "generation")
        query = f"UPDATE {GENERATIONS_TABLE} SET touched_at = now() WHERE key = %s RETURNING record"
        data = self.database.run(lambda conn: _one(conn, query, (key,)))
        if data is None:
            return None
        try:
            ref = parse_record(data.encode()).image
        except ValueError:
            return None
        # Touched before it is checked: if gc took it away in between, it is drawn again.
        if not self.store.touch(ref):
            return None
        return ref if self.store.contains(ref) else None

    def record(self, key: str, ref: ImageRef, *, thread_id: str | None = None) -> None:
        """Record that the call ``key`` of thread ``thread_id`` produced ``ref`` (committed)."""
        _check_key(key, "generation")
        data = LedgerRecord(thread_id=thread_id, image=ref).model_dump_json()
        self.database.run(lambda conn: conn.execute(_PUT_GENERATION, (key, thread_id, ref.sha256, data)))


class PostgresVerdictLedger:
    """The critic's verdicts (see ``storage.verdicts.VerdictLedger``) in ``interleave_verdicts``."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database

    def sweep_abandoned_writes(self) -> list[Path]:
        return []

    def lookup(self, key: str) -> VerdictRecord | None:
        _check_key(key, "verdict")
        query = f"UPDATE {VERDICTS_TABLE} SET touched_at = now() WHERE key = %s RETURNING record"
        data = self.database.run(lambda conn: _one(conn, query, (key,)))
        if data is None:
            return None
        try:
            return parse_verdict_record(data.encode())
        except ValueError:
            return None

    def record(
        self,
        key: str,
        critique: Critique,
        *,
        seconds: float = 0.0,
        thread_id: str | None = None,
        step: int | None = None,
        attempt: int | None = None,
    ) -> None:
        """Record that the critic question ``key`` was answered with ``critique`` (committed)."""
        _check_key(key, "verdict")
        data = VerdictRecord(
            thread_id=thread_id, step=step, attempt=attempt, critique=critique, seconds=max(0.0, seconds)
        ).model_dump_json()
        self.database.run(lambda conn: conn.execute(_PUT_VERDICT, (key, thread_id, data)))


def _check_key(key: str, kind: str) -> None:
    valid = is_generation_key if kind == "generation" else is_verdict_key
    if not valid(key):
        raise ValueError(f"{kind} key {key!r} is not a sha256 hex digest")
