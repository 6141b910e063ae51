"""The LangSmith guard: no image payload, in any content-block format, reaches the tracing endpoint."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langsmith import utils as ls_utils
from PIL import Image

from interleave_thinker.tracing import langsmith_tracer, strip_image_bytes

HOST = "127.0.0.1"


def noise_png() -> bytes:
    """A PNG of random pixels: its bytes, and their base64, cannot turn up by chance."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (48, 48), os.urandom(48 * 48 * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def payload_forms(data: bytes) -> dict[str, bytes]:
    """Pieces of ``data`` as they could appear in an upload: raw, base64 (standard and URL-safe,
    each alignment), and Python's escaped repr (as is and JSON-escaped)."""
    middle = data[len(data) // 2 - 24: len(data) // 2 + 24]
    forms = {"raw": middle}
    for offset in range(3):
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            encoded = encode(b"\0" * offset + middle)
            start, end = -(-offset * 8 // 6), (offset + len(middle)) * 8 // 6
            forms[f"{name}+{offset}"] = encoded[start:end]
    escaped = repr(middle)[2:-1]
    forms["repr"] = escaped.encode()
    forms["repr-json"] = json.dumps(escaped)[1:-1].encode()
    return forms


def found_in(uploads: bytes, data: bytes) -> list[str]:
    return [name for name, form in payload_forms(data).items() if form in uploads]


class RecordingEndpoint:
    """A LangSmith endpoint on 127.0.0.1 that answers every request with ``{}`` and keeps the
    request bodies (decompressed when they are)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self._body()
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "zstd":
                    import zstandard

                    body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
                endpoint.bodies.append(body)
                endpoint.paths.append(f"{self.command} {self.path}")
                reply = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_PATCH = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def uploads(self) -> bytes:
        return b"\n".join(self.bodies)


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingEndpoint]:
    server = RecordingEndpoint()
    monkeypatch.setenv("LANGSMITH_ENDPOINT", server.url)
    monkeypatch.setenv("LANGSMITH_API_KEY", "lsv2_test_key")
    monkeypatch.setenv("LANGSMITH_PROJECT", "trace-guard")
    # Plain multipart bodies (compression is only used when the server's /info asks for it).
    monkeypatch.setenv("LANGSMITH_DISABLE_RUN_COMPRESSION", "true")
    ls_utils.get_env_var.cache_clear()
    yield server
    server.close()
    ls_utils.get_env_var.cache_clear()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Every content-block format langchain-core knows for an inline image, and those of the
# providers' own APIs that callers pass through LangChain.
FORMATS: dict[str, Callable[[bytes], dict[str, Any]]] = {
    "standard image, base64": lambda d: {"type": "image", "base64": b64(d), "mime_type": "image/png"},
    "standard v0, source_type base64": lambda d: {
        "type": "image", "source_type": "base64", "data": b64(d), "mime_type": "image/png"},
    "standard file, base64": lambda d: {"type": "file", "base64": b64(d), "mime_type": "image/png"},
    "openai image_url data URL": lambda d: {"type": "image_url", "image_url": {"url": data_url(d)}},
    "openai image_url as a string": lambda d: {"type": "image_url", "image_url": data_url(d)},
    "openai responses input_image": lambda d: {"type": "input_image", "image_url": data_url(d)},
    "openai file_data": lambda d: {"type": "file", "file": {"filename": "a.png", "file_data": data_url(d)}},
    "anthropic source base64": lambda d: {
        "type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(d)}},
    "gemini inline_data": lambda d: {"inline_data": {"mime_type": "image/png", "data": b64(d)}},
    "gemini inlineData": lambda d: {"inlineData": {"mimeType": "image/png", "data": b64(d)}},
    "gemini media block": lambda d: {"type": "media", "mime_type": "image/png", "data": b64(d)},
    "bedrock source bytes": lambda d: {"image": {"format": "png", "source": {"bytes": d}}},
    "bedrock source bytes as base64": lambda d: {"image": {"format": "png", "source": {"bytes": b64(d)}}},
}


def test_every_format_is_replaced_by_the_hash_of_its_bytes() -> None:
    for name, make in FORMATS.items():
        data = noise_png()
        text = json.dumps(strip_image_bytes({"messages": [{"content": [make(data)]}]}), default=repr)
        assert found_in(text.encode(), data) == [], name
        assert "sha256:" + hashlib.sha256(data).hexdigest() in text, name


def test_references_and_ordinary_text_are_kept() -> None:
    keep = {
        "reference": {"type": "image", "file_id": "sha256:" + "c" * 64},
        "url": {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        "text": {"type": "text", "text": "Bob's kite " + "flies high " * 200 + "it's gone"},
        "dna": "ACGT" * 500,
        "counts": {"bytes": 1234, "data": {"steps": [1, 2]}},
        "hex": "0123456789abcdef" * 80,
    }
    assert strip_image_bytes(keep) == keep
    # Not changed in place: the run objects are shared with other tracers.
    block = {"type": "image", "base64": b64(noise_png())}
    before = dict(block)
    strip_image_bytes({"content": [block]})
    assert block == before


def test_payloads_inside_free_text_are_replaced() -> None:
    data = noise_png()
    text = (f"tool input {{'images': ['{data_url(data)}']}} and "
            f"{{'data': '{b64(data)}'}} and {{'bytes': {data!r}}}")
    stripped = strip_image_bytes(text)
    assert found_in(stripped.encode(), data) == []
    assert stripped.count("sha256:" + hashlib.sha256(data).hexdigest()) == 3


@pytest.mark.allow_hosts([HOST])
def test_no_format_reaches_the_tracing_endpoint(endpoint: RecordingEndpoint) -> None:
    tracer = langsmith_tracer()
    sent: dict[str, bytes] = {}
    for number, (name, make) in enumerate(FORMATS.items()):
        data_in, data_out = noise_png(), noise_png()
        sent[f"{name} (input)"] = data_in
        sent[f"{name} (output)"] = data_out
        reply = AIMessage(content=[{"type": "text", "text": "here"}, make(data_out)])
        model = GenericFakeChatModel(messages=iter([reply]))
        model.invoke(
            [HumanMessage(content=[{"type": "text", "text": f"format {name}"}, make(data_in)])],
            config={"callbacks": [tracer], "run_name": f"guard-{number}",
                    "metadata": {"preview": data_url(data_in)}},
        )

    # A tool called with a data URL, and a step whose input and output carry raw bytes and PIL.
    @tool
    def describe(image: str) -> str:
        """Describe an image given as a data URL."""
        return f"got {len(image)} characters"

    data_tool = noise_png()
    sent["tool argument"] = data_tool
    describe.invoke({"image": data_url(data_tool)}, config={"callbacks": [tracer]})
    data_raw, picture = noise_png(), Image.frombytes("RGB", (32, 32), os.urandom(32 * 32 * 3))
    sent["raw bytes"] = data_raw
    sent["PIL image"] = picture.tobytes()
    RunnableLambda(lambda x: {"echo": x["bytes"], "picture": x["picture"]}).invoke(
        {"bytes": data_raw, "picture": picture}, config={"callbacks": [tracer], "run_name": "raw"}
    )

    tracer.wait_for_futures()
    tracer.client.flush()
    uploads = endpoint.uploads
    # The runs did reach the endpoint, with the hashes in place of the images.
    assert b"guard-0" in uploads and b"describe" in uploads, endpoint.paths
    anthropic = sent["anthropic source base64 (input)"]
    assert f"sha256:{hashlib.sha256(anthropic).hexdigest()}".encode() in uploads
    leaked = {name: forms for name, data in sent.items() if (forms := found_in(uploads, data))}
    assert leaked == {}
