"""The released checkpoints' own prompts, read at run time from the user's clone of the official repository.

The official repository carries no licence, so its text never enters this project: the user
clones it (``interleave prompts fetch-official``) and we read three string constants out of
``UEval/system.py`` with :mod:`ast`. The file is parsed, never imported or executed.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from interleave_thinker.errors import ConfigurationError
from interleave_thinker.storage.atomic import write_atomically

OFFICIAL_REPOSITORY = "https://github.com/zhengdian1/InterleaveThinker"
SYSTEM_FILE = Path("UEval") / "system.py"
# Constant name -> the placeholders the official code fills into it (with str.replace).
REQUIRED_CONSTANTS: dict[str, tuple[str, ...]] = {
    "NARRATIVE_PROMPT_JSON": ("{text_input}",),
    "GUIDANCE_GLOBAL_PROMPT_JSON": ("{text_input}",),
    "Iterative_T2I_PROMPT_QWEN": ("{original_instruction}", "{rewritten_prompt}"),
}
# A system.py larger than this is not the file we know; refuse it before parsing.
_MAX_SYSTEM_FILE_BYTES = 2_000_000
CACHE_DIR_ENV = "INTERLEAVE_CACHE_DIR"
_RECORD_NAME = "official-prompts.json"
FETCH_COMMAND = "interleave prompts fetch-official"


@dataclass(frozen=True)
class OfficialTemplates:
    """The three official templates, as read from one clone."""

    narrative: str
    guidance: str
    critic: str
    source: Path


def cache_dir() -> Path:
    """The project's cache folder: ``$INTERLEAVE_CACHE_DIR``, else ``$XDG_CACHE_HOME`` or ~/.cache."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "interleave-thinker"


def read_official_templates(clone: str | os.PathLike[str]) -> OfficialTemplates:
    """Read and check the three templates in ``clone``/UEval/system.py; a clear error otherwise."""
    root = Path(clone).expanduser()
    path = root / SYSTEM_FILE
    hint = f"point --prompts official:PATH at a clone of {OFFICIAL_REPOSITORY}, or run `{FETCH_COMMAND}`"
    if not root.is_dir():
        raise ConfigurationError(f"official prompts: {root} is not a folder", hint=hint)
    if not path.is_file():
        raise ConfigurationError(
            f"official prompts: {path} does not exist (is {root} a clone of the official repository?)",
            hint=hint,
        )
    if path.stat().st_size > _MAX_SYSTEM_FILE_BYTES:
        raise ConfigurationError(f"official prompts: {path} is too large to be the prompt file", hint=hint)
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError) as exc:
        raise ConfigurationError(
            f"official prompts: {path} cannot be read as Python source: {exc}", hint=hint
        ) from exc
    constants = _string_constants(tree)
    texts: dict[str, str] = {}
    for name, placeholders in REQUIRED_CONSTANTS.items():
        text = constants.get(name)
        if text is None:
            raise ConfigurationError(
                f"official prompts: {path} defines no string constant {name}",
                hint="the file may come from another version of the repository; " + hint,
            )
        missing = [slot for slot in placeholders if slot not in text]
        if missing:
            raise ConfigurationError(
                f"official prompts: {name} in {path} lacks the placeholder(s) {', '.join(missing)}",
                hint="the file may have been edited or come from another version; " + hint,
            )
        texts[name] = text
    return OfficialTemplates(
        narrative=texts["NARRATIVE_PROMPT_JSON"],
        guidance=texts["GUIDANCE_GLOBAL_PROMPT_JSON"],
        critic=texts["Iterative_T2I_PROMPT_QWEN"],
        source=root,
    )


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Top-level ``NAME = "literal string"`` assignments (the last one wins, as in Python)."""
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                found[target.id] = value.value
    return found


# ---------------------------------------------------------------------------------------------
# The clone fetched into the cache


def recorded_clone() -> Path | None:
    """The clone ``interleave prompts fetch-official`` recorded, if it is still there."""
    record = cache_dir() / _RECORD_NAME
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = data.get("path") if isinstance(data, dict) else None
    if not isinstance(path, str) or not (Path(path) / SYSTEM_FILE).is_file():
        return None
    return Path(path)


def fetch_official(source: str = OFFICIAL_REPOSITORY) -> tuple[Path, OfficialTemplates]:
    """Clone ``source`` (a git URL or a local repository) into the cache, check it, record it.

    An earlier clone is replaced only once the new one has been checked, so a failed fetch
    leaves the working one in place.
    """
    git = shutil.which("git")
    if git is None:
        raise ConfigurationError("fetching the official prompts needs git", hint="install git")
    target = cache_dir() / "official" / "InterleaveThinker"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    clone = staging / "repo"
    try:
        done = subprocess.run(
            [git, "clone", "--depth", "1", "--quiet", "--", source, str(clone)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            check=False,
        )
        if done.returncode != 0:
            detail = " ".join((done.stderr or done.stdout).split())[:300]
            raise ConfigurationError(
                f"git could not clone {source}: {detail}",
                hint="check the address (or pass a local clone with --from PATH) and the network",
            )
        templates = read_official_templates(clone)
        shutil.rmtree(target, ignore_errors=True)
        clone.rename(target)
    except subprocess.TimeoutExpired as exc:
        raise ConfigurationError(
            f"git did not finish cloning {source} within 10 minutes", hint="check the network"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = cache_dir() / _RECORD_NAME
    write_atomically(record, (json.dumps({"path": str(target), "source": source}) + "\n").encode())
    return target, OfficialTemplates(templates.narrative, templates.guidance, templates.critic, target)
