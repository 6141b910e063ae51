"""Garbage collection of a run directory: images and ledger records that no thread references."""

from interleave_thinker.gc.collect import DEFAULT_MIN_AGE_S, acollect_garbage, collect_garbage
from interleave_thinker.gc.report import GarbageCollectionRefused, GcFile, GcReport, parse_duration

__all__ = [
    "DEFAULT_MIN_AGE_S",
    "GarbageCollectionRefused",
    "GcFile",
    "GcReport",
    "acollect_garbage",
    "collect_garbage",
    "parse_duration",
]
