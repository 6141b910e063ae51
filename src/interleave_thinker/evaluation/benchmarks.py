"""The benchmarks ``interleave eval`` knows, by the name given on the command line."""

from __future__ import annotations

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.evaluation.base import Benchmark
from interleave_thinker.evaluation.comm import CoMM
from interleave_thinker.evaluation.risebench import RiseBench
from interleave_thinker.evaluation.ueval import UEval
from interleave_thinker.evaluation.wise import LEGACY, VERIFIED, Wise

__all__ = ["BENCHMARK_NAMES", "get_benchmark"]

BENCHMARK_NAMES = ("ueval", "wise", "wise-verified", "risebench", "comm")


def get_benchmark(name: str) -> Benchmark:
    """A fresh benchmark object for ``name`` (ueval, wise, wise-verified, risebench or comm)."""
    if name == "ueval":
        return UEval()
    if name == "wise":
        return Wise(LEGACY, "wise")
    if name == "wise-verified":
        return Wise(VERIFIED, "wise-verified")
    if name == "risebench":
        return RiseBench()
    if name == "comm":
        return CoMM()
    raise ConfigurationError(
        f"unknown benchmark {name!r}", hint=f"choose one of {', '.join(BENCHMARK_NAMES)}"
    )
