"""Untrusted text made safe to show: no control characters, no bidi override leaking past its text."""

from __future__ import annotations

import re

# C0 controls other than tab and newline, DEL, C1 controls, and lone surrogates (which cannot be
# encoded as UTF-8). An escape sequence could drive a terminal; NUL is dropped by browsers.
_UNSHOWABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
REPLACEMENT = "\ufffd"

# Embeddings and overrides end at PDF; isolates end at PDI.
_EMBEDDINGS = frozenset("\u202a\u202b\u202d\u202e")
_ISOLATES = frozenset("\u2066\u2067\u2068")
_PDF, _PDI = "\u202c", "\u2069"
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")


def close_bidi(text: str) -> str:
    """``text`` with every bidi embedding, override or isolate it opens closed at its end.

    An unclosed right-to-left override in one field would otherwise reorder what follows it
    (the next field, a badge, a link) and make it read as something else.
    """
    if not _BIDI.search(text):
        return text
    stack: list[str] = []
    for char in text:
        if char in _EMBEDDINGS:
            stack.append(_PDF)
        elif char in _ISOLATES:
            stack.append(_PDI)
        elif char == _PDF and stack and stack[-1] == _PDF:
            stack.pop()
        elif char == _PDI and _PDI in stack:
            # A PDI also closes every embedding opened after its isolate.
            while stack.pop() != _PDI:
                pass
    return text + "".join(reversed(stack))


def display_text(text: str) -> str:
    """One piece of untrusted text for a page or a terminal: line ends become newlines,
    control characters and lone surrogates become U+FFFD, and each line closes its bidi controls."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _UNSHOWABLE.sub(REPLACEMENT, text)
    if not _BIDI.search(text):
        return text
    return "\n".join(close_bidi(line) for line in text.split("\n"))


def terminal_text(text: str) -> str:
    """Untrusted text for a terminal: escape sequences and other controls become U+FFFD.

    Bidi controls are left alone here: ``show --json`` prints JSON, which a closing mark
    after a line would break, and terminals draw text left to right anyway.
    """
    return _UNSHOWABLE.sub(REPLACEMENT, text.replace("\r\n", "\n").replace("\r", "\n"))
