"""PostgreSQL checkpoints: postgresql:// and postgres:// URLs open an AsyncPostgresSaver over a pool."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from langgraph.checkpoint.base import BaseCheckpointSaver

from interleave_thinker.checkpoints.savers import make_serializer
from interleave_thinker.errors import ConfigurationError

if TYPE_CHECKING:
    from psycopg import AsyncConnection

SCHEMES = ("postgresql", "postgres")
INSTALL_HINT = "pip install 'interleave-thinker[postgres]'"
URL_HINT = "write it as postgresql://USER:PASSWORD@HOST:5432/DATABASE"

# Our own query parameters; libpq refuses parameters it does not know, so they are taken out.
POOL_PARAMS = {"pool_min": 1, "pool_max": 4}
# libpq's own default is to wait forever on an unreachable host (psycopg: 130 s).
DEFAULT_CONNECT_TIMEOUT_S = 10
# Any fixed 64-bit number serves, as long as every process uses the same one.
SETUP_LOCK_KEY = 0x1A7E_41EA_5E70_0001
SETUP_LOCK_TIMEOUT_S = 120.0
SETUP_LOCK_POLL_S = 0.05

# Databases (by connection string) whose tables this process already set up.
_READY: set[str] = set()


@dataclass(frozen=True)
class PostgresTarget:
    """A parsed checkpointer URL: the libpq connection string and the pool size."""

    conninfo: str
    pool_min: int
    pool_max: int


def mask_password(url: str) -> str:
    """The URL with any password (in the user part or as a query parameter) shown as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        # Not even splittable: mask by pattern, so the error about it can still be shown.
        masked = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
        return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", masked)
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _passwords(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += re.findall(r"(?i)(?:^|&)password=([^&]*)", parts.query)
    return [p for raw in found if raw for p in {raw, unquote(raw)}]


def _scrub(text: str, url: str) -> str:
    """An error text on one line, with the URL's passwords masked should libpq echo them."""
    text = " ".join(text.split())
    for password in _passwords(url):
        text = text.replace(password, "***")
    return text


def parse_url(url: str) -> PostgresTarget:
    """Split our pool parameters (``?pool_min=1&pool_max=4``) off a PostgreSQL URL."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket, a host that normalizes to '#'
        raise ConfigurationError(
            f"checkpointer URL {mask_password(url)!r} cannot be read: {exc}", hint=URL_HINT
        ) from exc
    if parts.scheme not in SCHEMES:
        raise ConfigurationError(f"{mask_password(url)!r} is not a PostgreSQL URL", hint=URL_HINT)
    sizes = dict(POOL_PARAMS)
    kept = []
    # Raw segments are kept as written, so libpq decodes the rest of the query itself.
    for segment in filter(None, parts.query.split("&")):
        name, _, value = segment.partition("=")
        if name not in POOL_PARAMS:
            kept.append(segment)
            continue
        try:
            sizes[name] = int(unquote(value))
        except ValueError:
            sizes[name] = 0
        if sizes[name] < 1:
            raise ConfigurationError(
                f"{name}={unquote(value)!r} in checkpointer URL {mask_password(url)!r} "
                "is not a positive whole number",
                hint=f"for example {name}={POOL_PARAMS[name]}",
            )
    if sizes["pool_min"] > sizes["pool_max"]:
        raise ConfigurationError(
            f"pool_min={sizes['pool_min']} is above pool_max={sizes['pool_max']} "
            f"in checkpointer URL {mask_password(url)!r}",
            hint="make pool_min at most pool_max",
        )
    conninfo = urlunsplit(parts._replace(query="&".join(kept)))
    return PostgresTarget(conninfo, sizes["pool_min"], sizes["pool_max"])


def _connect_kwargs(conninfo: str, dict_row: Any) -> dict[str, Any]:
    """What langgraph-checkpoint-postgres requires of its connections, plus a connect timeout."""
    from psycopg.conninfo import conninfo_to_dict

    kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    if "connect_timeout" not in conninfo_to_dict(conninfo) and "PGCONNECT_TIMEOUT" not in os.environ:
        kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT_S
    return kwargs


async def _tables_are_current(conn: AsyncConnection[Any], migrations: int) -> bool:
    cursor = await conn.execute("SELECT to_regclass('checkpoint_migrations') IS NOT NULL AS present")
    row = await cursor.fetchone()
    if not row or not row["present"]:
        return False
    cursor = await conn.execute("SELECT max(v) AS v FROM checkpoint_migrations")
    row = await cursor.fetchone()
    return row is not None and row["v"] == migrations - 1


async def _setup_once(conn: AsyncConnection[Any], saver_class: Any, url: str) -> None:
    """Create or migrate the checkpoint tables, one process at a time.

    ``AsyncPostgresSaver.setup`` is not safe to run concurrently: two processes both insert the
    same migration version (a unique violation) or race on CREATE TABLE. A session advisory lock
    makes them take turns. It is polled with pg_try_advisory_lock rather than awaited with
    pg_advisory_lock, because setup runs CREATE INDEX CONCURRENTLY, which waits for every
    open snapshot, including that of a session blocked in pg_advisory_lock: a deadlock.
    """
    if await _tables_are_current(conn, len(saver_class.MIGRATIONS)):
        return
    deadline = time.monotonic() + SETUP_LOCK_TIMEOUT_S
    while True:
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (SETUP_LOCK_KEY,))
        row = await cursor.fetchone()
        if row and row["locked"]:
            break
        if time.monotonic() > deadline:
            raise ConfigurationError(
                f"timed out waiting for another process to create the checkpoint tables "
                f"in {mask_password(url)!r}",
                hint="check for a stuck interleave process or a long-running CREATE INDEX",
            )
        await asyncio.sleep(SETUP_LOCK_POLL_S)
    try:
        # setup() reads the migration version itself, so a turn after another's is a no-op.
        await saver_class(conn).setup()
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (SETUP_LOCK_KEY,))


@asynccontextmanager
async def open_postgres(url: str) -> AsyncIterator[BaseCheckpointSaver]:
    """An AsyncPostgresSaver over a connection pool, with its tables set up on first use."""
    target = parse_url(url)
    try:
        import psycopg
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool
    except ImportError as exc:
        raise ConfigurationError(
            f"PostgreSQL checkpoints need langgraph-checkpoint-postgres and psycopg ({exc})",
            hint=INSTALL_HINT,
        ) from exc

    shown = mask_password(url)
    try:
        kwargs = _connect_kwargs(target.conninfo, dict_row)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"checkpointer URL {shown!r} is not a valid PostgreSQL URL: {_scrub(str(exc), url)}",
            hint=URL_HINT + "; libpq parameters such as ?sslmode=require may follow",
        ) from exc
    try:
        # One plain connection first: it reports a refused connection or a missing database
        # as libpq words it (a pool would only time out), and it runs the setup.
        async with await psycopg.AsyncConnection.connect(target.conninfo, **kwargs) as conn:
            if target.conninfo not in _READY:
                await _setup_once(conn, AsyncPostgresSaver, url)
                _READY.add(target.conninfo)
    except psycopg.OperationalError as exc:
        raise ConfigurationError(
            f"cannot connect to the PostgreSQL checkpointer {shown!r}: {_scrub(str(exc), url)}",
            hint="check that the server runs and the database exists (createdb NAME); " + URL_HINT,
        ) from exc
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"cannot use the PostgreSQL checkpointer {shown!r}: {_scrub(str(exc), url)}",
            hint="the user needs rights to create tables in the database; " + URL_HINT,
        ) from exc

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        target.conninfo,
        min_size=target.pool_min,
        max_size=target.pool_max,
        kwargs=kwargs,
        open=False,
        # A connection dropped while idle (server restart, idle timeout) is replaced, not used.
        check=AsyncConnectionPool.check_connection,
        name="interleave-checkpoints",
    )
    try:
        await pool.open(wait=True, timeout=DEFAULT_CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        await pool.close()
        raise ConfigurationError(
            f"cannot open a connection pool to the PostgreSQL checkpointer {shown!r}: "
            f"{_scrub(str(exc), url)}",
            hint="check the server's max_connections, or lower pool_min in the URL",
        ) from exc
    try:
        yield AsyncPostgresSaver(pool, serde=make_serializer())
    finally:
        await pool.close()
