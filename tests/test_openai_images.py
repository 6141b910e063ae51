"""The OpenAI-compatible Images API generator against a mock server that inspects the real requests."""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from interleave_thinker.errors import ConfigurationError, GeneratorError, TransientGeneratorError
from interleave_thinker.generators.base import GenerationJob, ImageGenerator
from interleave_thinker.generators.openai_images import OpenAIImagesGenerator
from interleave_thinker.storage.image_store import encode_png

BASE_URL = "http://omni.test/v1"
MODEL = "Qwen/Qwen-Image"
Handler = Callable[[httpx.Request], "httpx.Response | Awaitable[httpx.Response]"]


def png(color: tuple[int, int, int], size: tuple[int, int] = (16, 8)) -> bytes:
    return encode_png(Image.new("RGB", size, color))


def gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (2, 2)).save(buffer, format="GIF")
    return buffer.getvalue()


def images_reply(*images: bytes) -> dict[str, Any]:
    return {"created": 0, "data": [{"b64_json": base64.b64encode(image).decode()} for image in images]}


def color_of(prompt: str) -> tuple[int, int, int]:
    """A distinct colour per prompt, so each image shows which request drew it."""
    value = sum(prompt.encode()) % 256
    return (value, 255 - value, 7)


def form(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, content) of each part of a multipart request."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + request.content)
    return [
        (
            part.get_param("name", header="content-disposition"),
            part.get_filename(),
            part.get_payload(decode=True),
        )
        for part in message.iter_parts()
    ]


def fields(request: httpx.Request) -> dict[str, Any]:
    """The request's parameters, from its JSON body or its multipart text fields."""
    if request.headers["content-type"].startswith("application/json"):
        return json.loads(request.content)
    return {name: content.decode() for name, filename, content in form(request) if filename is None}


class Server:
    """Records requests; answers each with ``answer(request)`` (sync or async)."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.answer(request)
        return await response if asyncio.iscoroutine(response) else response  # type: ignore[return-value]


def draw_prompts(request: httpx.Request) -> httpx.Response:
    """A healthy server: n images, each coloured by the prompt."""
    params = fields(request)
    n = int(params.get("n", 1))
    return httpx.Response(200, json=images_reply(*[png(color_of(params["prompt"]))] * n))


def generator(server: Server, **settings: Any) -> OpenAIImagesGenerator:
    settings.setdefault("model", MODEL)
    settings.setdefault("base_url", BASE_URL)
    return OpenAIImagesGenerator(
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(server)), **settings
    )


def job(
    prompt: str = "a red boat", seed: int = 1, sources: tuple[Image.Image, ...] = (), **rest: Any
) -> GenerationJob:
    return GenerationJob(prompt=prompt, seed=seed, width=64, height=32, source_images=sources, **rest)


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("INTERLEAVE_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's real backoff (0.5 s doubling) shrunk to milliseconds: same code path, fast test."""
    import openai._base_client as base_client

    monkeypatch.setattr(base_client, "INITIAL_RETRY_DELAY", 0.001)
    monkeypatch.setattr(base_client, "MAX_RETRY_DELAY", 0.002)


# -- identity and settings -------------------------------------------------------------------------


def test_identity_names_server_and_model_and_the_settings_that_change_pixels() -> None:
    served = OpenAIImagesGenerator(model=MODEL, base_url=BASE_URL)
    assert isinstance(served, ImageGenerator)
    assert served.identity == f"openai-images:{BASE_URL}:{MODEL}"
    assert OpenAIImagesGenerator(model="gpt-image-2").identity == "openai-images:api.openai.com:gpt-image-2"
    steps = OpenAIImagesGenerator(model=MODEL, base_url=BASE_URL, extra_body={"num_inference_steps": 8})
    assert steps.identity == f'openai-images:{BASE_URL}:{MODEL} ({{"num_inference_steps": 8}})'


@pytest.mark.parametrize(
    "settings", [{"max_concurrency": 0}, {"max_retries": -1}, {"timeout": 0}, {"model": ""}]
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        OpenAIImagesGenerator(**{"model": MODEL, **settings})


# -- requests --------------------------------------------------------------------------------------


async def test_generation_request_body_and_decoded_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLEAVE_API_KEY", "sk-omni")
    server = Server(draw_prompts)
    backend = generator(server, timeout=42.0, extra_body={"num_inference_steps": 4, "guidance_scale": 2.5})

    [image] = await backend.agenerate([job("a red boat", seed=1234)])

    request = server.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/images/generations"
    assert request.headers["authorization"] == "Bearer sk-omni"
    assert request.extensions["timeout"] == {"connect": 42.0, "read": 42.0, "write": 42.0, "pool": 42.0}
    assert json.loads(request.content) == {
        "model": MODEL,
        "prompt": "a red boat",
        "n": 1,
        "size": "64x32",
        "response_format": "b64_json",
        "seed": 1234,
        "num_inference_steps": 4,
        "guidance_scale": 2.5,
    }
    assert image == png(color_of("a red boat"))


async def test_openai_gpt_image_models_get_neither_response_format_nor_seed() -> None:
    server = Server(draw_prompts)
    backend = generator(server, model="gpt-image-2", base_url=None, api_key="sk-given")
    await backend.agenerate([job()])
    request = server.requests[0]
    assert str(request.url) == "https://api.openai.com/v1/images/generations"
    assert request.headers["authorization"] == "Bearer sk-given"
    body = json.loads(request.content)
    assert "response_format" not in body
    assert "seed" not in body


async def test_seed_and_response_format_can_be_switched() -> None:
    server = Server(draw_prompts)
    await generator(server, send_seed=False, send_response_format=False).agenerate([job()])
    await generator(server, model="gpt-image-2", send_seed=True, send_response_format=True).agenerate([job()])
    first, second = (json.loads(r.content) for r in server.requests)
    assert "seed" not in first and "response_format" not in first
    assert second["seed"] == 1 and second["response_format"] == "b64_json"


async def test_a_server_that_takes_no_seed_gets_a_hint() -> None:
    body = {"error": {"message": "Unknown parameter: 'seed'.", "type": "invalid_request_error"}}
    server = Server(lambda request: httpx.Response(400, json=body))
    with pytest.raises(GeneratorError, match="Unknown parameter") as caught:
        await generator(server).agenerate([job()])
    assert "send_seed=False" in caught.value.hint


async def test_edit_posts_the_source_as_a_png_file_with_the_fields() -> None:
    server = Server(draw_prompts)
    source = Image.new("RGB", (20, 10), (1, 2, 3))
    [image] = await generator(server).agenerate([job("paint it blue", seed=9, sources=(source,))])

    request = server.requests[0]
    assert str(request.url) == f"{BASE_URL}/images/edits"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    parts = form(request)
    files = [(name, filename, content) for name, filename, content in parts if filename is not None]
    assert [(name, filename) for name, filename, _ in files] == [("image", "source-0.png")]
    sent = Image.open(io.BytesIO(files[0][2]))
    assert sent.format == "PNG"
    assert sent.size == (20, 10)
    assert sent.convert("RGB").getpixel((0, 0)) == (1, 2, 3)
    assert fields(request) == {
        "model": MODEL,
        "prompt": "paint it blue",
        "n": "1",
        "size": "64x32",
        "response_format": "b64_json",
        "seed": "9",
    }
    assert image == png(color_of("paint it blue"))


async def test_several_sources_go_as_an_image_array_first_one_first() -> None:
    server = Server(draw_prompts)
    first, second = Image.new("RGB", (4, 4), (10, 0, 0)), Image.new("L", (4, 4), 200)
    await generator(server).agenerate([job("merge", sources=(first, second))])
    files = [(name, content) for name, filename, content in form(server.requests[0]) if filename]
    assert [name for name, _ in files] == ["image[]", "image[]"]
    assert Image.open(io.BytesIO(files[0][1])).getpixel((0, 0)) == (10, 0, 0)
    assert Image.open(io.BytesIO(files[1][1])).convert("RGB").getpixel((0, 0)) == (200, 200, 200)


async def test_a_batch_comes_back_in_job_order_however_the_server_finishes() -> None:
    prompts = [f"prompt number {index}" for index in range(6)]

    async def answer(request: httpx.Request) -> httpx.Response:
        prompt = fields(request)["prompt"]
        # The first jobs finish last.
        await asyncio.sleep(0.005 * (len(prompts) - prompts.index(prompt)))
        return draw_prompts(request)

    server = Server(answer)
    images = await generator(server, max_concurrency=6).agenerate(
        [job(prompt, seed=index) for index, prompt in enumerate(prompts)]
    )
    assert images == [png(color_of(prompt)) for prompt in prompts]
    assert sorted(int(fields(r)["seed"]) for r in server.requests) == list(range(6))


async def test_without_seeds_identical_jobs_share_one_request_with_n() -> None:
    server = Server(draw_prompts)
    source = Image.new("RGB", (4, 4), (5, 5, 5))
    same_pixels = Image.new("RGB", (4, 4), (5, 5, 5))
    jobs = [
        job("cat", seed=1),
        job("dog", seed=2),
        job("cat", seed=3),
        job("edit", seed=4, sources=(source,)),
        job("edit", seed=5, sources=(same_pixels,)),
        job("cat", seed=6),
    ]
    images = await generator(server, send_seed=False).agenerate(jobs)

    calls = sorted((fields(r)["prompt"], int(fields(r)["n"])) for r in server.requests)
    assert calls == [("cat", 3), ("dog", 1), ("edit", 2)]
    assert images == [png(color_of(j.prompt)) for j in jobs]


async def test_with_seeds_every_job_is_its_own_request() -> None:
    server = Server(draw_prompts)
    await generator(server).agenerate([job("cat", seed=1), job("cat", seed=2)])
    assert sorted(int(fields(r)["seed"]) for r in server.requests) == [1, 2]
    assert all(int(fields(r)["n"]) == 1 for r in server.requests)


async def test_concurrency_is_bounded() -> None:
    in_flight = 0
    most = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return draw_prompts(request)

    server = Server(answer)
    backend = generator(server, max_concurrency=3)
    jobs = [job(f"p{index}", seed=index) for index in range(10)]
    # Two batches at once share the bound: it is the generator's, not one call's.
    first, second = await asyncio.gather(backend.agenerate(jobs[:5]), backend.agenerate(jobs[5:]))
    assert len(first) + len(second) == 10
    assert len(server.requests) == 10
    assert most == 3


async def test_one_failure_fails_the_batch_and_stops_the_waiting_requests() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        if fields(request)["prompt"] == "bad":
            return httpx.Response(401, json={"error": {"message": "no"}})
        await asyncio.sleep(0.05)
        return draw_prompts(request)

    server = Server(answer)
    jobs = [job("bad", seed=0)] + [job(f"p{index}", seed=index) for index in range(1, 8)]
    with pytest.raises(GeneratorError):
        await generator(server, max_concurrency=2).agenerate(jobs)
    assert len(server.requests) < len(jobs)


def test_a_generator_serves_several_event_loops() -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.001)  # hold the slot, so the other job really waits for it
        return draw_prompts(request)

    server = Server(answer)
    # One slot and two jobs: the second waits on the semaphore, which binds it to the running loop.
    backend = generator(server, max_concurrency=1)

    async def draw() -> list[Any]:
        images = await backend.agenerate([job("a", seed=1), job("b", seed=2)])
        await backend.aclose()  # leaves the given client open for the next loop
        return images

    assert asyncio.run(draw()) == asyncio.run(draw())
    assert len(server.requests) == 4


# -- failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        {
            "code": "moderation_blocked",
            "message": "Your request was rejected by the safety system.",
            "type": "image_generation_user_error",
            "param": None,
        },
        {
            "code": "content_policy_violation",
            "message": "This request has been blocked by our content filters.",
            "type": "invalid_request_error",
            "param": None,
        },
    ],
)
async def test_a_refused_prompt_is_a_permanent_error_saying_so(error: dict[str, Any]) -> None:
    server = Server(lambda request: httpx.Response(400, json={"error": error}))
    with pytest.raises(GeneratorError) as caught:
        await generator(server).agenerate([job(step=3, thread_id="t-1")])
    message = str(caught.value)
    assert "refused the prompt" in message
    assert "cannot be drawn as worded" in message
    assert error["message"] in message
    assert "thread t-1, step 3" in message
    assert "reword" in caught.value.hint
    assert len(server.requests) == 1  # a 400 is not retried


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_is_a_permanent_error_about_the_key(status: int) -> None:
    server = Server(lambda request: httpx.Response(status, json={"error": {"message": "Incorrect API key"}}))
    with pytest.raises(GeneratorError, match="API key") as caught:
        await generator(server).agenerate([job()])
    assert "INTERLEAVE_API_KEY" in caught.value.hint
    assert len(server.requests) == 1


async def test_an_unknown_model_is_named() -> None:
    server = Server(lambda request: httpx.Response(404, json={"message": "The model `nope` does not exist."}))
    with pytest.raises(GeneratorError, match="no model 'nope'"):
        await generator(server, model="nope").agenerate([job()])


async def test_other_bad_requests_carry_the_servers_message() -> None:
    server = Server(
        lambda request: httpx.Response(400, json={"object": "error", "message": "size too large"})
    )
    with pytest.raises(GeneratorError, match="size too large"):
        await generator(server).agenerate([job()])


@pytest.mark.usefixtures("fast_retries")
async def test_a_server_that_stays_unavailable_is_transient_after_the_sdks_retries() -> None:
    server = Server(lambda request: httpx.Response(503, json={"error": {"message": "overloaded"}}))
    with pytest.raises(TransientGeneratorError, match="overloaded"):
        await generator(server, max_retries=2).agenerate([job()])
    assert len(server.requests) == 3
    assert [r.headers["x-stainless-retry-count"] for r in server.requests] == ["0", "1", "2"]


@pytest.mark.usefixtures("fast_retries")
async def test_429_and_500_are_retried_to_success() -> None:
    replies = iter([httpx.Response(429), httpx.Response(500)])
    server = Server(lambda request: next(replies, None) or draw_prompts(request))
    [image] = await generator(server, max_retries=2).agenerate([job("x")])
    assert image == png(color_of("x"))
    assert len(server.requests) == 3


@pytest.mark.usefixtures("fast_retries")
async def test_out_of_quota_is_permanent() -> None:
    body = {"error": {"code": "insufficient_quota", "message": "You exceeded your current quota"}}
    server = Server(lambda request: httpx.Response(429, json=body))
    with pytest.raises(GeneratorError, match="quota"):
        await generator(server, max_retries=1).agenerate([job()])


@pytest.mark.usefixtures("fast_retries")
@pytest.mark.parametrize(
    ("failure", "words"),
    [
        (httpx.ReadTimeout("read timed out"), "did not answer"),
        (httpx.ConnectError("refused"), "cannot reach"),
    ],
)
async def test_timeouts_and_connection_errors_are_transient(failure: Exception, words: str) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise failure

    server = Server(answer)
    with pytest.raises(TransientGeneratorError, match=words):
        await generator(server, max_retries=1).agenerate([job()])
    assert len(server.requests) == 2


BROKEN_REPLIES: dict[str, tuple[dict[str, Any], str]] = {
    "no data": ({"json": {"created": 0}}, "no image data"),
    "too few images": ({"json": {"created": 0, "data": []}}, "returned 0 image"),
    "empty item": ({"json": {"created": 0, "data": [{}]}}, "no image data"),
    "url only": ({"json": {"created": 0, "data": [{"url": "http://x/y.png"}]}}, "URL instead"),
    "bad base64": ({"json": {"created": 0, "data": [{"b64_json": "@@not base64@@"}]}}, "not valid base64"),
    "not an image": (
        {"json": {"created": 0, "data": [{"b64_json": base64.b64encode(b"hello").decode()}]}},
        "not an image",
    ),
    "gif": ({"json": images_reply(gif())}, "GIF"),
    "invalid json": ({"content": b"{oops", "headers": {"content-type": "application/json"}}, "not JSON"),
    "html page": (
        {"content": b"<html>proxy login</html>", "headers": {"content-type": "text/html"}},
        "no image",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN_REPLIES))
async def test_a_reply_without_usable_image_data_is_a_permanent_error(name: str) -> None:
    reply, words = BROKEN_REPLIES[name]
    server = Server(lambda request: httpx.Response(200, **reply))
    with pytest.raises(GeneratorError, match=words):
        await generator(server).agenerate([job()])
    assert len(server.requests) == 1


async def test_sizes_must_be_positive() -> None:
    with pytest.raises(GeneratorError, match="0x32"):
        await generator(Server(draw_prompts)).agenerate(
            [GenerationJob(prompt="p", seed=1, width=0, height=32)]
        )
