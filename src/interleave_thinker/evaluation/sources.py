"""Read a benchmark's own judge prompts from the user's clone of its repository, as text.

The prompts are the benchmarks' text, not ours: they are never copied into this project. Python
files are parsed with :mod:`ast` (never imported or executed); other files are read as text.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

from interleave_thinker.errors import ConfigurationError

# A source file larger than this is not the file we know; refuse it before parsing.
MAX_SOURCE_BYTES = 4_000_000


@dataclass(frozen=True)
class Clone:
    """A benchmark repository checked out by the user; every read names the file it needs."""

    root: Path
    benchmark: str
    repository: str

    @classmethod
    def at(cls, path: str | os.PathLike[str] | None, *, benchmark: str, repository: str) -> Clone:
        if path is None:
            raise ConfigurationError(
                f"{benchmark}: the judge prompts are read from your clone of {repository}",
                hint=f"git clone {repository} and pass --bench-repo PATH",
            )
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ConfigurationError(
                f"{benchmark}: --bench-repo {root} is not a folder",
                hint=f"pass the folder of your clone of {repository}",
            )
        return cls(root, benchmark, repository)

    def file(self, relative: str) -> Path:
        path = self.root / relative
        if not path.is_file():
            raise ConfigurationError(
                f"{self.benchmark}: {path} does not exist (is {self.root} a clone of {self.repository}?)",
                hint=f"pass --bench-repo with the folder of a clone of {self.repository}",
            )
        if path.stat().st_size > MAX_SOURCE_BYTES:
            raise ConfigurationError(f"{self.benchmark}: {path} is too large to be the file we read")
        return path

    def text(self, relative: str) -> str:
        path = self.file(relative)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{self.benchmark}: cannot read {path}: {exc}") from exc

    def module(self, relative: str) -> ast.Module:
        path = self.file(relative)
        try:
            return ast.parse(self.text(relative), filename=str(path))
        except (SyntaxError, ValueError, RecursionError) as exc:
            raise ConfigurationError(
                f"{self.benchmark}: {path} cannot be read as Python source: {exc}",
                hint="the file may come from another version of the repository",
            ) from exc

    def constants(self, relative: str, names: dict[str, tuple[str, ...]]) -> dict[str, str]:
        """The top-level string constants ``names`` of a Python file, each checked to hold the
        placeholders listed for it; a clear error naming the first one that is missing."""
        found = string_constants(self.module(relative))
        texts: dict[str, str] = {}
        for name, placeholders in names.items():
            text = found.get(name)
            if text is None:
                raise ConfigurationError(
                    f"{self.benchmark}: {self.root / relative} defines no string constant {name}",
                    hint="the file may come from another version of the repository",
                )
            missing = [slot for slot in placeholders if slot not in text]
            if missing:
                raise ConfigurationError(
                    f"{self.benchmark}: {name} in {self.root / relative} lacks {', '.join(missing)}",
                    hint="the file may have been edited or come from another version",
                )
            texts[name] = text
        return texts


def string_constants(tree: ast.Module) -> dict[str, str]:
    """Top-level ``NAME = "literal"`` (or ``"literal".strip()``) assignments; the last one wins."""
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        text = literal_text(value)
        if text is None:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                found[target.id] = text
    return found


_STRIPS = {"strip": str.strip, "lstrip": str.lstrip, "rstrip": str.rstrip}


def literal_text(node: ast.expr) -> str | None:
    """A string literal, optionally with an argument-free strip()/lstrip()/rstrip() applied."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in _STRIPS
        and not node.args
        and not node.keywords
    ):
        inner = literal_text(node.func.value)
        return None if inner is None else _STRIPS[node.func.attr](inner)
    return None


def function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    return None


# -- message templates written as Python literals -----------------------------------------------
# A template is a list of messages; each content part is ("text", segments) or ("image", None),
# where segments are literal strings and ("field", NAME) slots filled from the item.

Segment = str | tuple[str, str]
Part = tuple[str, tuple[Segment, ...]]


@dataclass(frozen=True)
class MessageTemplate:
    """Chat messages read from a function that returns them as a list-of-dicts literal."""

    messages: tuple[tuple[str, tuple[Part, ...]], ...]

    def fields(self) -> set[str]:
        return {
            segment[1]
            for _, parts in self.messages
            for kind, segments in parts
            if kind == "text"
            for segment in segments
            if isinstance(segment, tuple)
        }

    def image_slots(self) -> int:
        return sum(kind == "image" for _, parts in self.messages for kind, _ in parts)


def returned_messages(tree: ast.Module, function_name: str, *, where: str, benchmark: str) -> MessageTemplate:
    """The chat messages a function returns as ``[{"role": ..., "content": [...]}, ...]``.

    Text parts may be f-strings whose expressions are ``SOMETHING['Field']``: each becomes a slot
    for the item's field. ``image_url`` parts become image slots.
    """
    node = function(tree, function_name)
    returned = None
    if node is not None:
        returns = [n for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
        returned = returns[-1].value if returns else None
    if not isinstance(returned, ast.List):
        raise ConfigurationError(
            f"{benchmark}: {where} has no function {function_name} returning a list of messages",
            hint="the file may come from another version of the repository",
        )
    messages = []
    for element in returned.elts:
        entry = _dict_literal(element)
        role = entry.get("role")
        content = entry.get("content")
        if not (isinstance(role, ast.Constant) and isinstance(role.value, str)):
            raise ConfigurationError(f"{benchmark}: a message in {where} has no literal role")
        parts: list[Part] = []
        if isinstance(content, ast.List):
            for part_node in content.elts:
                parts.append(_part(_dict_literal(part_node), where=where, benchmark=benchmark))
        else:
            text = content and _segments(content)
            if text is None:
                raise ConfigurationError(f"{benchmark}: a message in {where} has unreadable content")
            parts.append(("text", text))
        messages.append((role.value, tuple(parts)))
    return MessageTemplate(tuple(messages))


def _dict_literal(node: ast.expr) -> dict[str, ast.expr]:
    if not isinstance(node, ast.Dict):
        return {}
    return {
        key.value: value
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and isinstance(key.value, str)
    }


def _part(entry: dict[str, ast.expr], *, where: str, benchmark: str) -> Part:
    kind = entry.get("type")
    kind_name = kind.value if isinstance(kind, ast.Constant) else None
    if kind_name == "image_url":
        return ("image", ())
    if kind_name == "text" and "text" in entry:
        segments = _segments(entry["text"])
        if segments is not None:
            return ("text", segments)
    raise ConfigurationError(
        f"{benchmark}: a content part in {where} is neither literal text nor an image",
        hint="the file may come from another version of the repository",
    )


def _segments(node: ast.expr) -> tuple[Segment, ...] | None:
    text = literal_text(node)
    if text is not None:
        return (text,)
    if not isinstance(node, ast.JoinedStr):
        return None
    segments: list[Segment] = []
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            segments.append(value.value)
        elif isinstance(value, ast.FormattedValue) and value.format_spec is None and value.conversion == -1:
            field = value.value
            if (
                isinstance(field, ast.Subscript)
                and isinstance(field.slice, ast.Constant)
                and isinstance(field.slice.value, str)
            ):
                segments.append(("field", field.slice.value))
            else:
                return None
        else:
            return None
    return tuple(segments)


def render_segments(segments: tuple[Segment, ...], values: dict[str, object]) -> str:
    """The text of a template part with every field slot replaced as an f-string would."""
    return "".join(s if isinstance(s, str) else f"{values[s[1]]}" for s in segments)
