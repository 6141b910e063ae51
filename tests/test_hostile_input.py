"""Hostile input through the user-facing entry points: each gets a clear error or safe output.

Each row is checked through the CLI (typer's CliRunner, or the console script) and/or the Python
API (arun, aresume, aload_document, arun_batch, GenerateImageTool). "Refused" means exit code 1
with one ``error:`` line and one ``hint:`` line (a ConfigurationError or ImageError with a hint
from the API), and nothing already done is lost.

HOSTILE INPUT                                  -> OUTCOME  [TEST]
Request text
  empty or whitespace-only                     -> refused: "the request text is empty"
                                                  [test_bad_request_text_is_refused_by_cli_api_and_batch]
  over 10,000 characters (state.MAX_REQUEST_CHARS) -> refused, names length and limit  [same]
  exactly 10,000 characters                    -> accepted  [test_request_text_limit_is_inclusive]
  NUL, ESC (terminal codes), C1 control        -> refused, names the character and position  [same]
  invalid UTF-8 in a CLI argument              -> refused, names the byte and position
                                                  [same; test_console_script_refuses_a_non_utf8_argument]
  lone surrogate escape (API, batch JSON)      -> refused  [test_bad_request_text_...]
  bidi overrides (request or model text)       -> kept; closed inside their own text node
                                                  [test_request_with_bidi_controls_runs_and_renders_them_closed]
  (a request read from a file: the CLI has no such option)
Input images (--image, arun(images=...), batch "images")
  missing path, directory                      -> refused: "does not exist" / "is a directory"
                                                  [test_bad_input_image_is_refused_and_nothing_is_stored]
  corrupt bytes, truncated PNG, truncated JPEG -> refused: "could not be decoded"  [same]
  decompression bomb (tiny file, 10^10 px)     -> refused fast: "pixels"  [same]
  GIF, BMP, TIFF, SVG, PDF, HTML, text, empty  -> refused, names the format  [same]
  symlink to /dev/zero, a FIFO                 -> refused at once, nothing read, no hang  [same]
  sparse file over 64 MiB                      -> refused from its size, nothing read
                                                  [test_enormous_image_is_refused_without_reading_it]
  file name that is not UTF-8                  -> refused, the name shown as \\xNN
                                                  [test_undecodable_image_file_name_is_printed_safely]
  bad image on one batch line                  -> that prompt fails with the reason, others finish
                                                  [test_batch_prompt_with_a_bad_image_fails_alone]
  batch image ../x, /abs/x, a symlink out      -> that line fails unless --allow-outside-images
                                                  [test_batch_image_paths.py]
  EXIF rotation, 16-bit, hidden colour under alpha, CMYK, palette, animated PNG/WebP, over
  64 megapixels                                -> normalised once when stored (models and page see
                                                  the same bytes) or refused naming the animation
                                                  or our 64-megapixel limit
                                                  [test_image_normalisation.py]
Thread ids and image references
  ../x, /etc/x, a/b, .., ., Cyrillic or fullwidth look-alikes, 200 chars, newline, space,
  backslash, non-UTF-8                         -> refused by run --thread, resume, show, export (and
                                                  arun, aresume, aload_document, athread_report),
                                                  saying why; no file or folder created
                                                  [test_hostile_thread_id_is_refused_everywhere,
                                                   test_hostile_thread_id_is_refused_by_the_api]
  empty thread id                              -> refused (not silently replaced by a new id)
                                                  [test_empty_thread_id_is_refused_not_replaced]
  batch ids ../../x, /etc/passwd, look-alike   -> safe thread ids, documents stay in documents/
                                                  [test_batch_ids_cannot_escape_the_run_directory]
  hash ../../etc/passwd, non-hex, uppercase, 63/65 chars, empty, trailing newline, slash
                                               -> refused by GenerateImageTool source_images and
                                                  ImageStore.find, nothing drawn
                                                  [test_hostile_source_hash_is_refused_by_the_tool;
                                                   ImageRef: test_image_store.py::
                                                   test_image_ref_refuses_anything_but_a_lowercase_sha256]
Files named on the command line
  --plan sources step:N missing/future/self, 0, negative, input:N without inputs, ../x
                                               -> refused; the thread keeps waiting for review,
                                                  nothing is drawn, --accept-plan still finishes it
                                                  [test_bad_plan_file_is_refused_and_the_thread_keeps_waiting]
  --plan file not UTF-8, not JSON, not an object, missing, a directory, a FIFO, /dev/zero
                                               -> refused at once, thread keeps waiting  [same]
  --plan text with a lone surrogate escape     -> stored as U+FFFD, the run finishes
                                                  [test_plan_with_a_surrogate_escape_is_stored_safely]
  --config not UTF-8, not TOML, a directory, a FIFO -> refused  [test_bad_config_file_is_refused]
  batch lines: not UTF-8, bad JSON, not an object, surrogate escapes, empty id or text, NUL,
  over-long text (after a BOM, with CRLF)      -> each named with its line number, the other lines
                                                  run, exit 1
                                                  [test_hostile_batch_lines_are_named_and_the_rest_run]
  batch file missing, a directory, a FIFO, /dev/zero -> refused at once
                                                  [test_unreadable_batch_file_is_refused]
Export paths (interleave export -o)
  an existing directory                        -> refused, directory untouched  [test_export_paths]
  a folder that does not exist                 -> the folders are created  [same]
  below a path that is a file                  -> refused, names the file in the way  [same]
  an existing file / a symlink                 -> replaced atomically; a symlink is replaced, its
                                                  target untouched  [same]
  the checkpoint DB (and -wal), images/, generations/ -> refused; the thread still loads
                                                  [test_export_cannot_overwrite_the_run_directory_data]
  Markdown with odd names (space, #?%, newline, brackets, non-UTF-8 byte, ".md", no suffix)
                                               -> images in "<stem>_files/", links percent-encoded
                                                  and resolving to the copied files
                                                  [test_markdown_image_folder_for_odd_output_names]
Script and markup (request text, planner step names/text/prompts, critic feedback)
  <script>, onerror, javascript:, </details>, HTML comments, ![x](http://evil), [a](javascript:),
  raw HTML, <style>                            -> HTML: escaped text, one CSP meta, no script, no
                                                  event handler, no URL but data:image, structure
                                                  intact; Markdown: no '<', links only into the
                                                  image folder; JSON: round-trips exactly
                                                  [test_hostile_model_text_is_inert_in_every_export]
  control characters in model text             -> U+FFFD in HTML and Markdown, no ESC on the
                                                  terminal (show); exact in JSON  [same]
  renderer escaping, unit level                -> test_render.py::test_html_escapes_hostile_text,
                                                  test_markdown_escapes_hostile_text
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from click.testing import Result
from langchain_core.messages import BaseMessage
from PIL import Image
from typer.testing import CliRunner

from conftest import RecordingGenerator, scripted
from interleave_thinker.batch import arun_batch, thread_id_for
from interleave_thinker.cli import app
from interleave_thinker.context import Backends
from interleave_thinker.errors import ConfigurationError, ImageError
from interleave_thinker.inspect import aload_document, athread_report
from interleave_thinker.models.stand_ins import StandInCriticModel, StandInPlannerModel
from interleave_thinker.render import load_document_json
from interleave_thinker.runner import aresume, arun
from interleave_thinker.state import MAX_REQUEST_CHARS, Request, RunOptions
from interleave_thinker.storage import image_store
from interleave_thinker.storage.image_store import ImageStore
from interleave_thinker.tools.generator_tool import GenerateImageTool
from interleave_thinker.workspace import store_input_images
from test_render import PageParts, parse_page

SMALL = ["--size", "32x32"]
TINY = RunOptions(width=32, height=32)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> CliRunner:
    monkeypatch.setenv("INTERLEAVE_RUN_DIR", str(run_dir))
    monkeypatch.delenv("INTERLEAVE_CONFIG", raising=False)
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    return CliRunner()


def invoke(cli: CliRunner, *args: str | Path, within: float = 60.0) -> Result:
    """Run the CLI in a daemon thread, so that a command blocked on a FIFO fails the test
    instead of hanging the whole run."""
    box: list[Result] = []
    worker = threading.Thread(
        target=lambda: box.append(cli.invoke(app, [str(arg) for arg in args])), daemon=True
    )
    worker.start()
    worker.join(within)
    if not box:
        pytest.fail(f"`interleave {' '.join(map(str, args))}` did not return within {within}s")
    return box[0]


def refused(result: Result, *phrases: str) -> str:
    """Assert a clean refusal: exit 1, last two stderr lines 'error: ...' and 'hint: ...'."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 2, result.stderr
    error, hint = lines[-2], lines[-1]
    assert error.startswith("error: ") and hint.startswith("hint: "), result.stderr
    for phrase in phrases:
        assert phrase in error, (phrase, error)
    return error


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def listed(cli: CliRunner) -> dict[str, dict[str, Any]]:
    result = invoke(cli, "list", "--json")
    assert result.exit_code == 0, result.stderr
    return {row["thread_id"]: row for row in map(json.loads, result.stdout.splitlines())}


def stand_ins() -> Backends:
    return Backends(planner=StandInPlannerModel(), critic=StandInCriticModel(),
                    generator=RecordingGenerator())


# ---------------------------------------------------------------------------------------------
# Request text

BAD_TEXTS = {
    "empty": ("", "the request text is empty"),
    "whitespace": ("  \n\t \r\n ", "the request text is empty"),
    "oversized": ("word " * 2001, "10,005 characters long, over the limit of 10,000"),
    "nul": ("Draw a cat\x00 and a dog.", "control character U+0000 at character 11"),
    "escape-codes": ("Draw \x1b[2J\x1b]0;pwned\x07 a cat.", "control character U+001B at character 6"),
    "c1-control": ("Draw \x9b31m a cat.", "control character U+009B"),
    "invalid-utf8-arg": ("caf\udce9 au lait", "not valid UTF-8: byte 0xe9 at character 4"),
    "lone-surrogate": ("a \ud83d alone", "lone surrogate U+D83D at character 3"),
}


@pytest.mark.parametrize("name", list(BAD_TEXTS))
async def test_bad_request_text_is_refused_by_cli_api_and_batch(
    name: str, cli: CliRunner, run_dir: Path, tmp_path: Path
) -> None:
    text, phrase = BAD_TEXTS[name]
    refused(invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "t", text), phrase)
    # Refused before anything was stored: no thread, no image.
    assert listed(cli) == {} and files_under(run_dir / "images") == []

    with pytest.raises(ConfigurationError, match=re.escape(phrase)) as info:
        await arun(text, backends=stand_ins(), options=TINY, run_dir=run_dir)
    assert info.value.hint

    # In a batch file the same text is one bad line; the good line next to it runs.
    line = json.dumps({"id": "bad", "text": text})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(line + "\n" + json.dumps({"id": "good", "text": "A kite."}) + "\n")
    report = await arun_batch(prompts, backends=stand_ins(), options=TINY,
                              run_dir=tmp_path / "batch-runs")
    assert [(o.prompt_id, o.status) for o in report.outcomes] == [("good", "done")]
    (bad,) = report.bad_lines
    assert bad.line == 1 and phrase in bad.error


def test_request_text_limit_is_inclusive() -> None:
    assert Request(text="a" * MAX_REQUEST_CHARS).text
    with pytest.raises(ValueError, match="over the limit"):
        Request(text="a" * (MAX_REQUEST_CHARS + 1))


def test_console_script_refuses_a_non_utf8_argument(tmp_path: Path) -> None:
    # Real argv bytes, decoded by Python with surrogateescape: the path a terminal takes.
    script = Path(sys.executable).with_name("interleave")
    command = [os.fsencode(script), b"run", b"--profile", b"test", b"caf\xe9 au lait"]
    env = {**os.environ, "INTERLEAVE_RUN_DIR": str(tmp_path / "runs")}
    done = subprocess.run(command, capture_output=True, timeout=120, env=env)
    assert done.returncode == 1
    stderr = done.stderr.decode("utf-8")
    assert "error: the request text is not valid UTF-8: byte 0xe9 at character 4" in stderr
    assert "hint: pass the text as UTF-8" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------
# Parsing the HTML and Markdown exports


_OPENERS = {"\u202a": "\u202c", "\u202b": "\u202c", "\u202d": "\u202c", "\u202e": "\u202c",
            "\u2066": "\u2069", "\u2067": "\u2069", "\u2068": "\u2069"}


def bidi_closed(text: str) -> bool:
    """True when every bidi embedding, override and isolate in ``text`` is closed in it."""
    stack: list[str] = []
    for char in text:
        if char in _OPENERS:
            stack.append(_OPENERS[char])
        elif char == "\u202c" and stack and stack[-1] == "\u202c":
            stack.pop()
        elif char == "\u2069" and "\u2069" in stack:
            while stack.pop() != "\u2069":
                pass
    return not stack


def assert_inert_html(page: str, steps: int, folds: int) -> PageParts:
    parsed = parse_page(page)
    metas = [attrs for tag, attrs in parsed.starts if tag == "meta"
             and (attrs.get("http-equiv") or "").lower() == "content-security-policy"]
    assert len(metas) == 1
    csp = metas[0]["content"] or ""
    assert "default-src 'none'" in csp and "img-src data:" in csp and "script-src" not in csp
    tags = [tag for tag, _ in parsed.starts]
    for forbidden in ("script", "iframe", "object", "embed", "link", "base", "form", "a",
                      "svg", "math", "noscript", "template", "frame"):
        assert forbidden not in tags, forbidden
    for tag, attrs in parsed.starts:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            if name in ("src", "href", "srcset", "action", "formaction", "xlink:href", "poster"):
                # Images are data URIs: nothing is fetched from anywhere.
                assert (value or "").startswith("data:image/"), (tag, name, value)
            # Text in alt or title attributes is inert; no attribute may carry CSS.
            assert name != "style", tag
    assert not parsed.comments and not parsed.others
    # Injected closing tags were text: the page's own structure is intact.
    assert tags.count("article") == parsed.ends.count("article") == steps
    assert tags.count("details") == parsed.ends.count("details") == folds
    assert all(bidi_closed(text) for text in parsed.texts)
    assert not any(char in text for text in parsed.texts for char in "\x00\x1b\x07\x9b")
    return parsed


def md_links(markdown: str) -> list[str]:
    # Link targets the renderer wrote; an untrusted ']' is always escaped as '\]'.
    return re.findall(r"(?<!\\)\]\(([^)\s]*)\)", markdown)


# ---------------------------------------------------------------------------------------------
# Script and markup in user text and in model text

PAYLOADS = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "javascript:alert(3)",
    "</details></li></ol></article><p>",
    "<!-- hidden --> -->",
    "![pixel](http://evil.example/pixel.png)",
    "[click](javascript:alert(4))",
    "<a href='http://evil.example/'>raw html</a>",
    "<style>body{display:none}</style>",
    "\u202eevil\u202c and \u2067unclosed",
)
HOSTILE = " ".join(PAYLOADS)
CONTROLS = "\x1b[2J\x1b]0;pwned\x07\x00\x9b"


def _planner_reply(_: list[BaseMessage]) -> str:
    steps = [
        {"step_number": 1, "step_name": f"Open {HOSTILE}{CONTROLS}",
         "instruction": f"Show {HOSTILE}", "prompt": f"draw {HOSTILE}",
         "auxiliary_text": f"Aux {HOSTILE}\n\n# not a heading {CONTROLS}"},
        {"step_number": 2, "step_name": "Talk", "instruction": f"Say {HOSTILE}",
         "prompt": None, "auxiliary_text": f"Only words {HOSTILE}"},
        {"step_number": 3, "step_name": "Close", "instruction": f"Finish {HOSTILE}",
         "prompt": f"edit {HOSTILE}", "auxiliary_text": None, "sources": [1]},
    ]
    return f"<think>planning {HOSTILE}</think><answer>{ {'execution_plan': steps}!r}</answer>"


def _critic() -> Any:
    calls: list[int] = []

    def reply(_: list[BaseMessage]) -> str:
        calls.append(1)
        # The first attempt is rejected, so critic feedback reaches the document.
        answer = {"previous_step_success": len(calls) > 1,
                  "refine_prompt": f"refine {HOSTILE}{CONTROLS}" if len(calls) == 1 else None}
        return f"<think>judging {HOSTILE}{CONTROLS}</think><answer>{answer!r}</answer>"

    return scripted(reply, name="hostile-critic")


async def test_hostile_model_text_is_inert_in_every_export(
    cli: CliRunner, run_dir: Path, tmp_path: Path
) -> None:
    backends = Backends(planner=scripted(_planner_reply, name="hostile-planner"),
                        critic=_critic(), generator=RecordingGenerator())
    request = f"Tell a story {HOSTILE}"
    result = await arun(request, backends=backends, options=TINY, run_dir=run_dir,
                        thread_id="hostile")
    document = result.document
    assert document.request.text == request
    assert [s.status for s in document.steps] == ["accepted", "text", "accepted"]
    critique = document.steps[0].attempts[0].critique
    assert critique is not None and HOSTILE in (critique.refine_prompt or "")

    # HTML, as written by the run and by `interleave export`.
    out = tmp_path / "export"
    assert invoke(cli, "export", "hostile", "--format", "html", "-o", out / "d.html").exit_code == 0
    page = (out / "d.html").read_text(encoding="utf-8")
    assert page == result.document_path.read_text(encoding="utf-8")
    parsed = assert_inert_html(page, steps=3, folds=2)
    text = "".join(parsed.texts)
    # Every payload is shown as text, not dropped: the parser gives it back verbatim.
    for payload in PAYLOADS[:-1]:
        assert payload in text, payload
    assert "\ufffd" in text  # the control characters, made visible and harmless

    # Markdown: no raw HTML at all, links only into the image folder, no heading injected.
    assert invoke(cli, "export", "hostile", "--format", "md", "-o", out / "d.md").exit_code == 0
    markdown = (out / "d.md").read_text(encoding="utf-8")
    assert "<" not in markdown and not any(char in markdown for char in "\x00\x1b\x07\x9b")
    links = md_links(markdown)
    assert links and all(link.startswith("d_files/") for link in links)
    assert all((out / unquote_to_bytes(link).decode()).is_file() for link in links)
    images_shown = sum(step.image is not None for step in document.steps)
    assert len(re.findall(r"(?<!\\)!\[", markdown)) == images_shown
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in markdown
    assert not re.search(r"^#+ not a heading", markdown, flags=re.MULTILINE)
    assert all(bidi_closed(line) for line in markdown.splitlines())

    # JSON: exact, including every control and bidi character.
    assert invoke(cli, "export", "hostile", "--format", "json", "-o", out / "d.json").exit_code == 0
    thread, loaded = load_document_json((out / "d.json").read_text(encoding="utf-8"))
    assert (thread, loaded) == ("hostile", await aload_document("hostile", run_dir=run_dir))
    assert loaded.steps[0].name == f"Open {HOSTILE}{CONTROLS}"
    assert loaded.steps[0].attempts[0].critique.reasoning == f"judging {HOSTILE}{CONTROLS}"

    # The terminal: `show` prints model text without its escape sequences.
    shown = invoke(cli, "show", "hostile")
    assert shown.exit_code == 0 and "Open <script>" in shown.stdout
    assert not any(char in shown.stdout for char in "\x00\x1b\x07\x9b")
    as_json = invoke(cli, "show", "hostile", "--json")
    assert json.loads(as_json.stdout)["steps"][0]["name"].startswith("Open <script>")
    assert "\x1b" not in as_json.stdout


def test_request_with_bidi_controls_runs_and_renders_them_closed(cli: CliRunner) -> None:
    text = "Draw a sign reading \u202eNEPO\u202c. Then a door \u2067marked exit."
    result = invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "bidi", text)
    assert result.exit_code == 0, result.stderr
    page = Path(result.stdout.strip().splitlines()[-1]).read_text(encoding="utf-8")
    parsed = assert_inert_html(page, steps=2, folds=2)
    assert any("\u202eNEPO\u202c" in node for node in parsed.texts)
    exported = invoke(cli, "export", "bidi", "--format", "json")
    assert exported.exit_code == 0, exported.stderr
    payload = json.loads(Path(exported.stdout.strip()).read_text(encoding="utf-8"))
    assert payload["document"]["request"]["text"] == text


# ---------------------------------------------------------------------------------------------
# Input images


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bomb_png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def _encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "teal").save(buffer, format=fmt)
    return buffer.getvalue()


def _write(data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "input.img"
        path.write_bytes(data)
        return path

    return make


def _directory(folder: Path) -> Path:
    (folder / "photos").mkdir()
    return folder / "photos"


def _zero_link(folder: Path) -> Path:
    (folder / "zero.png").symlink_to("/dev/zero")
    return folder / "zero.png"


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.png")
    return folder / "pipe.png"


BAD_IMAGES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda folder: folder / "nope.png", "does not exist"),
    "directory": (_directory, "is a directory"),
    "corrupt": (_write(b"\x89PNG\r\n\x1a\n" + b"\x13\x37" * 200), "could not be decoded"),
    "truncated-png": (_write(_encoded("PNG")[:-30]), "could not be decoded"),
    "truncated-jpeg": (_write(_encoded("JPEG")[:-300]), "could not be decoded"),
    "decompression-bomb": (_write(_bomb_png(100_000, 100_000)), "pixels"),
    "gif": (_write(_encoded("GIF")), "is a GIF image, not PNG, JPEG or WebP"),
    "bmp": (_write(_encoded("BMP")), "is a BMP image"),
    "tiff": (_write(_encoded("TIFF")), "is a TIFF image"),
    "svg": (_write(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
                   b'width="9" height="9"><script>alert(1)</script></svg>'), "is an SVG file"),
    "pdf": (_write(_encoded("PDF")), "is a PDF document"),
    "html": (_write(b"<!DOCTYPE html><html><body>hi</body></html>"), "is an HTML page"),
    "text": (_write(b"just some words"), "is not a PNG, JPEG or WebP file"),
    "empty": (_write(b""), "is empty (0 bytes)"),
    "symlink-to-dev-zero": (_zero_link, "is not a regular file"),
    "fifo": (_fifo, "is not a regular file"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
async def test_bad_input_image_is_refused_and_nothing_is_stored(
    name: str, cli: CliRunner, run_dir: Path, tmp_path: Path
) -> None:
    make, phrase = BAD_IMAGES[name]
    path = make(tmp_path)
    started = time.perf_counter()
    refused(invoke(cli, "run", "--profile", "test", *SMALL, "--image", path, "Tidy it.",
                   within=30), "input image", phrase)
    assert time.perf_counter() - started < 10
    assert listed(cli) == {} and files_under(run_dir / "images") == []
    with pytest.raises(ImageError, match=re.escape(phrase)) as info:
        await arun("Tidy it.", images=[path], backends=stand_ins(), options=TINY,
                   run_dir=tmp_path / "api")
    assert info.value.hint


def test_enormous_image_is_refused_without_reading_it(cli: CliRunner, tmp_path: Path) -> None:
    # A sparse file one byte over the limit costs no disk; reading it would cost 64 MiB.
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(image_store.MAX_IMAGE_BYTES + 1)
    store = ImageStore(tmp_path / "images")
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=f"over the {image_store.MAX_IMAGE_BYTES:,} byte"):
            store_input_images(store, [huge])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024
    refused(invoke(cli, "run", "--profile", "test", "--image", huge, "x"),
            f"is {image_store.MAX_IMAGE_BYTES + 1:,} bytes")


def test_undecodable_image_file_name_is_printed_safely(cli: CliRunner, tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.gif"
    with open(raw, "wb") as handle:
        handle.write(_encoded("GIF"))
    error = refused(invoke(cli, "run", "--profile", "test", "--image", os.fsdecode(raw), "x"),
                    "is a GIF image")
    assert "caf\\xe9.gif" in error


async def test_batch_prompt_with_a_bad_image_fails_alone(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(_encoded("PNG"))
    lines = [{"id": "missing", "text": "A.", "images": ["nope.png"]},
             {"id": "zero", "text": "A.", "images": ["/dev/zero"]},
             {"id": "ok", "text": "A.", "images": ["good.png"]}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # /dev/zero lies outside the prompt file's folder: refused for that unless allowed
    # (test_batch_image_paths.py), and for what it is when allowed.
    report = await arun_batch(prompts, backends=stand_ins(), options=TINY,
                              run_dir=tmp_path / "runs", allow_outside_images=True)
    outcomes = {o.prompt_id: o for o in report.outcomes}
    assert outcomes["ok"].status == "done"
    assert outcomes["missing"].status == outcomes["zero"].status == "failed"
    assert "does not exist" in (outcomes["missing"].error or "")
    assert "is not a regular file" in (outcomes["zero"].error or "")
    report = await arun_batch(prompts, backends=stand_ins(), options=TINY,
                              run_dir=tmp_path / "runs")
    zero = next(o for o in report.outcomes if o.prompt_id == "zero")
    assert zero.status == "failed" and "is an absolute path" in (zero.error or "")


# ---------------------------------------------------------------------------------------------
# Thread ids and image hashes

HOSTILE_IDS = {
    "parent": ("../x", "contains '/'"),
    "absolute": ("/etc/x", "contains '/'"),
    "nested": ("a/b", "contains '/'"),
    "dotdot": ("..", "must start with a letter or digit"),
    "dot": (".", "must start with a letter or digit"),
    "cyrillic-look-alike": ("\u0430bc", "U+0430"),
    "fullwidth-look-alike": ("\uff52un", "U+FF52"),
    "too-long": ("x" * 200, "200 characters long"),
    "newline": ("ab\n", "U+000A"),
    "space": ("a b", "U+0020"),
    "backslash": ("a\\b", "U+005C"),
    "non-utf8": ("\udcff", "U+DCFF"),
}


def _tree(root: Path) -> list[Path]:
    # SQLite's -wal and -shm files come and go with each connection.
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if not p.name.endswith(("-wal", "-shm")))


@pytest.mark.parametrize("name", list(HOSTILE_IDS))
def test_hostile_thread_id_is_refused_everywhere(
    name: str, cli: CliRunner, run_dir: Path, tmp_path: Path
) -> None:
    thread, why = HOSTILE_IDS[name]
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "real", "A.").exit_code == 0
    before = _tree(tmp_path)
    for command in (["run", "--profile", "test", "--thread", thread, "A."], ["resume", thread],
                    ["show", thread], ["export", thread], ["export", thread, "--format", "md"]):
        refused(invoke(cli, *command), "thread id", "is not allowed", why)
    # Nothing was created anywhere: no folder named after the id, inside or outside run_dir.
    assert _tree(tmp_path) == before
    assert set(listed(cli)) == {"real"}


def test_empty_thread_id_is_refused_not_replaced(cli: CliRunner) -> None:
    for command in (["run", "--profile", "test", "--thread", "", "A."], ["resume", ""],
                    ["show", ""], ["export", ""]):
        refused(invoke(cli, *command), "thread id '' is not allowed: it is empty")
    assert listed(cli) == {}


async def test_hostile_thread_id_is_refused_by_the_api(run_dir: Path) -> None:
    for thread, _ in HOSTILE_IDS.values():
        with pytest.raises(ConfigurationError, match="is not allowed"):
            await arun("A.", backends=stand_ins(), options=TINY, run_dir=run_dir,
                       thread_id=thread)
        for call in (aresume, aload_document, athread_report):
            with pytest.raises(ConfigurationError, match="is not allowed"):
                await call(thread, run_dir=run_dir)
    assert not (run_dir / "documents").exists()


async def test_batch_ids_cannot_escape_the_run_directory(tmp_path: Path) -> None:
    ids = ["../../escape", "/etc/passwd", "a/../../b", "\u0430dmin", "..", "x" * 500]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": "A."}) + "\n" for i in ids))
    run_dir = tmp_path / "runs"
    report = await arun_batch(prompts, backends=stand_ins(), options=TINY, run_dir=run_dir)
    assert [o.status for o in report.outcomes] == ["done"] * len(ids)
    documents = (run_dir / "documents").resolve()
    for outcome in report.outcomes:
        assert outcome.thread_id == thread_id_for(outcome.prompt_id)
        assert Path(outcome.document or "").resolve().parent.parent == documents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "runs"]


def test_hostile_source_hash_is_refused_by_the_tool(tmp_path: Path) -> None:
    generator = RecordingGenerator()
    store = ImageStore(tmp_path / "images")
    tool = GenerateImageTool(generator=generator, image_store=store)
    real = tool.invoke({"prompt": "a boat", "width": 16, "height": 16}).split("sha256 ")[1][:64]
    drawn = len(generator.jobs)
    bad = ["../../etc/passwd", "../" + real[3:], "g" * 64, real.upper(), real[:63], real + "a",
           "", real + "\n", " " + real, real[:32] + "/" + real[33:]]
    for digest in bad:
        with pytest.raises(ImageError, match="is not an image hash"):
            tool.invoke({"prompt": "edit", "width": 16, "height": 16, "source_images": [digest]})
        with pytest.raises(ImageError, match="is not an image hash"):
            store.find(digest)
    with pytest.raises(ImageError, match="no image"):
        tool.invoke({"prompt": "edit", "source_images": ["0" * 64]})
    assert len(generator.jobs) == drawn


# ---------------------------------------------------------------------------------------------
# Plan files, config files and batch files


def _paused_thread(cli: CliRunner) -> tuple[Path, dict[str, Any]]:
    first = invoke(cli, "run", "--profile", "test", *SMALL, "--review-plan", "--thread", "rv",
                   "A fox sleeps. The fox wakes. It runs.")
    assert first.exit_code == 0, first.stderr
    plan_file = Path(first.stdout.strip().splitlines()[-1])
    return plan_file, json.loads(plan_file.read_text(encoding="utf-8"))


def _with_sources(plan: dict[str, Any], sources: Any) -> dict[str, Any]:
    edited = json.loads(json.dumps(plan))
    edited["execution_plan"][1]["sources"] = sources
    return edited


def test_bad_plan_file_is_refused_and_the_thread_keeps_waiting(
    cli: CliRunner, tmp_path: Path
) -> None:
    _, plan = _paused_thread(cli)
    bad_sources = {
        "missing step": (["step:9"], "no earlier step 9"),
        "future step": ([3], "no earlier step 3"),
        "itself": (["step:2"], "no earlier step 2"),
        "zero": (["step:0"], "out of range"),
        "negative": ([-1], "out of range"),
        "input without inputs": (["input:1"], "no input image 1"),
        "traversal": (["../x"], "expected an earlier step number"),
    }
    cases: list[tuple[Path, str]] = []
    for name, (sources, phrase) in bad_sources.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_with_sources(plan, sources)))
        cases.append((path, phrase))
    raw = {
        "latin1.json": (b'{"execution_plan": "caf\xe9"}', "not UTF-8 text (byte 0xe9"),
        "broken.json": (b'{"execution_plan": [', "cannot read the edited plan"),
        "list.json": (b"[1, 2]", "is not a JSON object"),
        "deep.json": (b"[" * 100_000, "nested too deeply"),
    }
    for name, (data, phrase) in raw.items():
        (tmp_path / name).write_bytes(data)
        cases.append((tmp_path / name, phrase))
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "dev-zero.json").symlink_to("/dev/zero")
    cases += [(tmp_path / "pipe.json", "is not a regular file"),
              (tmp_path / "dev-zero.json", "is not a regular file"),
              (tmp_path / "nope.json", "does not exist"), (tmp_path, "is a directory")]
    for path, phrase in cases:
        refused(invoke(cli, "resume", "rv", "--plan", path, within=30), phrase)
        # Nothing lost and nothing done: still waiting, nothing drawn.
        assert listed(cli)["rv"]["status"] == "waiting for review"
        assert listed(cli)["rv"]["generator_calls"] == 0
    done = invoke(cli, "resume", "rv", "--accept-plan")
    assert done.exit_code == 0, done.stderr
    assert listed(cli)["rv"]["status"] == "done"


def test_plan_with_a_surrogate_escape_is_stored_safely(cli: CliRunner, tmp_path: Path) -> None:
    _, plan = _paused_thread(cli)
    plan["execution_plan"][1]["prompt"] = "the fox \udcff yawns"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(plan))  # ASCII JSON with a "\udcff" escape
    done = invoke(cli, "resume", "rv", "--plan", edited)
    assert done.exit_code == 0, done.stderr
    report = json.loads(invoke(cli, "show", "rv", "--json").stdout)
    assert report["steps"][1]["prompt"] == "the fox \ufffd yawns"


def test_bad_config_file_is_refused(cli: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "latin1.toml").write_bytes(b"planner = 'caf\xe9'\n")
    (tmp_path / "broken.toml").write_text("planner = \n")
    os.mkfifo(tmp_path / "pipe.toml")
    cases = {tmp_path / "latin1.toml": "settings file", tmp_path / "broken.toml": "not valid TOML",
             tmp_path / "pipe.toml": "is not a regular file", tmp_path: "is not a regular file",
             tmp_path / "missing.toml": "does not exist"}
    for path, phrase in cases.items():
        refused(invoke(cli, "run", "--profile", "test", "--config", path, "A.", within=30), phrase)
    assert listed(cli) == {}


def test_hostile_batch_lines_are_named_and_the_rest_run(cli: CliRunner, tmp_path: Path) -> None:
    lines = [
        b'{"id": "first", "text": "A kite."}',  # after a byte-order mark
        b'{"id": "latin", "text": "caf\xe9"}',
        b'{"id": "crlf", "text": "A boat."}\r',
        b"",
        b'{"id": "broken", "text": ',
        b'["not", "an", "object"]',
        b'{"id": "sur", "text": "a \\ud800 b"}',
        b'{"id": "\\udcff", "text": "A."}',
        b'{"id": "", "text": "A."}',
        b'{"id": "blank", "text": "   "}',
        b'{"id": "nul", "text": "a\\u0000b"}',
        b'{"id": "long", "text": "' + b"y" * (MAX_REQUEST_CHARS + 1) + b'"}',
        b'{"id": "last", "text": "A hill."}',
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    result = invoke(cli, "batch", prompts, "--profile", "test", *SMALL)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    expected = {2: "line is not UTF-8 text (byte 0xe9", 5: ":5: ", 6: ":6: ",
                7: "lone surrogate U+D800", 8: "unicode string", 9: "at least 1 character",
                10: "the request text is empty", 11: "control character U+0000",
                12: "over the limit of 10,000"}
    for number, phrase in expected.items():
        line = next(x for x in result.stderr.splitlines() if x.startswith(f"error: {prompts}:{number}:"))
        assert phrase in line, (number, line)
    assert "3 finished, 0 failed, 9 invalid lines" in result.stderr
    assert {k: v["status"] for k, v in listed(cli).items()} == {
        thread_id_for(i): "done" for i in ("first", "crlf", "last")}


def test_unreadable_batch_file_is_refused(cli: CliRunner, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    cases = {tmp_path / "pipe.jsonl": "is not a regular file",
             tmp_path / "zero.jsonl": "is not a regular file",
             tmp_path / "nope.jsonl": "does not exist", tmp_path: "is a directory"}
    for path, phrase in cases.items():
        refused(invoke(cli, "batch", path, "--profile", "test", within=30), "prompt file", phrase)


# ---------------------------------------------------------------------------------------------
# Export paths


def test_export_paths(cli: CliRunner, tmp_path: Path) -> None:
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "t", "A. B.").exit_code == 0
    folder = tmp_path / "existing"
    folder.mkdir()
    for fmt in ("html", "md", "json"):
        refused(invoke(cli, "export", "t", "--format", fmt, "-o", folder), "is a directory")
    assert list(folder.iterdir()) == []

    deep = tmp_path / "new" / "deeper" / "doc.md"
    assert invoke(cli, "export", "t", "--format", "md", "-o", deep).exit_code == 0
    assert deep.is_file() and (deep.parent / "doc_files").is_dir()

    blocker = tmp_path / "plain-file"
    blocker.write_text("keep me")
    for fmt in ("html", "md", "json"):
        refused(invoke(cli, "export", "t", "--format", fmt, "-o", blocker / "sub" / f"d.{fmt}"),
                "is a file, not a folder")
    assert blocker.read_text() == "keep me"

    # Over an existing file: replaced whole. Over a symlink: the link is replaced, its target kept.
    old = tmp_path / "old.json"
    old.write_text("previous contents")
    assert invoke(cli, "export", "t", "--format", "json", "-o", old).exit_code == 0
    assert json.loads(old.read_text())["thread_id"] == "t"
    target = tmp_path / "precious.txt"
    target.write_text("do not touch")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    assert invoke(cli, "export", "t", "--format", "html", "-o", link).exit_code == 0
    assert target.read_text() == "do not touch"
    assert not link.is_symlink() and link.read_text().startswith("<!DOCTYPE html>")
    assert not list(tmp_path.rglob(".tmp-*"))


def test_export_cannot_overwrite_the_run_directory_data(cli: CliRunner, run_dir: Path) -> None:
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "t", "A. B.").exit_code == 0
    images = files_under(run_dir / "images")
    database = run_dir / "checkpoints.sqlite"
    before = database.read_bytes()
    for target in (database, run_dir / "checkpoints.sqlite-wal", images[0],
                   run_dir / "images" / "new.md", run_dir / "generations" / "x.json"):
        refused(invoke(cli, "export", "t", "--format", "json", "-o", target),
                "would overwrite the run's own data")
    # A Markdown export inside images/ is refused before its image folder is made.
    refused(invoke(cli, "export", "t", "--format", "md", "-o", run_dir / "images" / "d.md"),
            "would overwrite the run's own data")
    assert not (run_dir / "images" / "d_files").exists()
    assert database.read_bytes() == before and files_under(run_dir / "images") == images
    assert invoke(cli, "show", "t").exit_code == 0


@pytest.mark.parametrize(
    "name", ["my doc.md", "a#b?c%d.md", "line\nbreak.md", "[x](javascript:y).md", "caf\udce9.md",
             ".md", "no-suffix"],
)
def test_markdown_image_folder_for_odd_output_names(
    name: str, cli: CliRunner, tmp_path: Path
) -> None:
    assert invoke(cli, "run", "--profile", "test", *SMALL, "--thread", "t", "A. B.").exit_code == 0
    out = tmp_path / "out" / name
    result = invoke(cli, "export", "t", "--format", "md", "-o", out)
    assert result.exit_code == 0, result.stderr
    markdown = out.read_text(encoding="utf-8")
    folder = out.parent / f"{out.stem}_files"
    assert folder.is_dir()
    links = md_links(markdown)
    assert len(links) >= 2
    for link in links:
        assert not any(char in link for char in " \n()[]#?")
        # The link, percent-decoded to bytes, names a copied image in the folder.
        resolved = out.parent / os.fsdecode(unquote_to_bytes(link))
        assert resolved.parent == folder and resolved.is_file()
