"""Run the `interleave` CLI through fault_entry.py, with the test critic logging every call.

Each call of the test profile's critic appends ``{"pid", "planned", "used"}`` as a JSON line to
``$INTERLEAVE_TEST_CRITIC_LOG``, so a test can count how often each attempt was judged across
processes that were killed and resumed. Nothing here is imported by production code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from langchain_core.messages import BaseMessage

import fault_entry
from interleave_thinker.models.stand_ins import StandInCriticModel
from interleave_thinker.prompts.templates import prompts_from_messages

CRITIC_LOG_ENV = "INTERLEAVE_TEST_CRITIC_LOG"


def _install_critic_log() -> None:
    original = StandInCriticModel._reply
    log = os.environ.get(CRITIC_LOG_ENV)

    def logged(self: StandInCriticModel, messages: Sequence[BaseMessage]) -> str:
        if log:
            planned, used = prompts_from_messages(messages) or ("", "")
            line = json.dumps({"pid": os.getpid(), "planned": planned, "used": used}) + "\n"
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return original(self, messages)

    StandInCriticModel._reply = logged  # type: ignore[method-assign]


if __name__ == "__main__":
    _install_critic_log()
    fault_entry.main()
