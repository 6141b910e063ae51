"""Collecting garbage in a PostgreSQL image store: rows as gc/collect.py sorts a run directory's files.

Ages are on the database's clock (``touched_at`` is set by the server), so the cutoff is read
from the server too. A row is removed by one ``DELETE ... WHERE touched_at < cutoff``: a run
that stores or looks up the same row meanwhile moves its time past the cutoff and keeps it.
"""

from __future__ import annotations

from interleave_thinker.gc.report import GcFile, GcReport
from interleave_thinker.storage.postgres_images import (
    GENERATIONS_TABLE,
    IMAGES_TABLE,
    VERDICTS_TABLE,
    PostgresDatabase,
    StoredRow,
)

__all__ = ["database_cutoff", "remove_rows", "scan_rows"]


def database_cutoff(database: PostgresDatabase, min_age_s: float) -> float:
    """The time (database clock) before which an unreferenced row may go."""
    return database.now() - min_age_s


def _found(table: str, row: StoredRow) -> GcFile:
    # Rows are named like files of a store: "<table>/<key>".
    return GcFile(f"{table}/{row.key}", row.size, row.touched)


def scan_rows(
    database: PostgresDatabase, threads: set[str], referenced: set[str], cutoff: float, report: GcReport
) -> None:
    """Sort every row of the three tables into kept, orphan or young (blocking)."""
    needed = set(referenced)
    for row in database.rows(GENERATIONS_TABLE):
        report.records += 1
        if row.thread_id is None:
            report.records_without_thread += 1
            needed.add(row.sha256 or "")
        elif row.thread_id in threads:
            needed.add(row.sha256 or "")
        elif row.touched >= cutoff:
            # A run may be writing this thread's first checkpoint right now.
            report.young_records.append(_found(GENERATIONS_TABLE, row))
            needed.add(row.sha256 or "")
        else:
            report.orphan_records.append(_found(GENERATIONS_TABLE, row))
    for row in database.rows(IMAGES_TABLE):
        report.images += 1
        report.image_bytes += row.size
        if row.key in needed:
            report.referenced_images += 1
        elif row.touched >= cutoff:
            report.young_images.append(_found(IMAGES_TABLE, row))
        else:
            report.orphan_images.append(_found(IMAGES_TABLE, row))
    for row in database.rows(VERDICTS_TABLE):
        report.verdicts += 1
        if row.thread_id is None or row.thread_id in threads:
            continue
        if row.touched >= cutoff:
            report.young_verdicts.append(_found(VERDICTS_TABLE, row))
        else:
            report.orphan_verdicts.append(_found(VERDICTS_TABLE, row))


def remove_rows(database: PostgresDatabase, cutoff: float, report: GcReport) -> None:
    """Delete the orphans found, records before images; rows used since the scan stay (blocking)."""

    def remove(found: list[GcFile]) -> list[GcFile]:
        removed = []
        for item in found:
            table, _, key = str(item.path).partition("/")
            (removed if database.delete_if_older(table, key, cutoff) else report.in_use).append(item)
        return removed

    report.orphan_records = remove(report.orphan_records)
    report.orphan_images = remove(report.orphan_images)
    report.orphan_verdicts = remove(report.orphan_verdicts)
