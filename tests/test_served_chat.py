"""Served chat models: the requests ChatOpenAI really sends, retries, broken replies and factory routes."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from PIL import Image

from interleave_thinker.context import model_identity, model_label
from interleave_thinker.errors import ConfigurationError
from interleave_thinker.models.messages import image_data_block
from interleave_thinker.models.served import (
    MalformedResponseError,
    served_chat_model,
    strict_json_schema,
    structured_binding,
)
from interleave_thinker.prompts.parsing import parse_plan, parse_verdict
from interleave_thinker.prompts.schemas import PlanAnswer, VerdictAnswer
from interleave_thinker.storage.image_store import ImageStore, encode_png

BASE_URL = "http://vllm.test/v1"
MODEL = "InterleaveThinker/critic-7b"
Handler = Callable[[httpx.Request], httpx.Response]


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }


class Server:
    """A MockTransport handler that records every request and answers from a script."""

    def __init__(self, *responses: httpx.Response | Handler) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.responses:
            raise AssertionError("the mock server ran out of responses")
        response = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        return response(request) if callable(response) else response

    def body(self, index: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[index].content)


def model_for(server: Server, **settings: Any) -> BaseChatModel:
    settings.setdefault("base_url", BASE_URL)
    return served_chat_model(
        settings.pop("model", MODEL),
        http_client=httpx.Client(transport=httpx.MockTransport(server)),
        http_async_client=httpx.AsyncClient(transport=httpx.MockTransport(server)),
        **settings,
    )


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


# -- the request on the wire -----------------------------------------------------------------------


async def test_request_carries_model_images_schema_extra_body_key_and_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INTERLEAVE_API_KEY", "sk-interleave")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    server = Server(
        httpx.Response(200, json=completion('{"previous_step_success": true, "refine_prompt": null}'))
    )
    extra = {"top_k": 20, "repetition_penalty": 1.05, "chat_template_kwargs": {"enable_thinking": False}}
    model = model_for(server, timeout=12.5, max_tokens=256, extra_body=extra)
    store = ImageStore(tmp_path)
    ref = store.put(encode_png(Image.new("RGB", (8, 8), (200, 10, 10))))
    block = image_data_block(store, ref)

    reply = await structured_binding(model, VerdictAnswer, "verdict").ainvoke(
        [
            SystemMessage("You judge images."),
            HumanMessage(content=[{"type": "text", "text": "Did it work?"}, block]),
        ]
    )

    request = server.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-interleave"
    assert request.extensions["timeout"] == {"connect": 12.5, "read": 12.5, "write": 12.5, "pool": 12.5}
    body = server.body()
    assert body["model"] == MODEL
    # Unset sampling knobs are not sent: the server applies the model's own defaults.
    assert "temperature" not in body and "top_p" not in body
    assert body["max_completion_tokens"] == 256
    assert body["messages"][0] == {"role": "system", "content": "You judge images."}
    text, image = body["messages"][1]["content"]
    assert text == {"type": "text", "text": "Did it work?"}
    assert image == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{block['base64']}"},
    }
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": strict_json_schema(VerdictAnswer), "strict": True},
    }
    # extra_body fields are merged into the top level, where vLLM reads them.
    assert "extra_body" not in body
    for key, value in extra.items():
        assert body[key] == value

    critique = parse_verdict(reply.text)
    assert critique.success is True
    assert critique.refine_prompt is None


@pytest.mark.parametrize(
    ("env", "explicit", "expected"),
    [
        ({}, None, "EMPTY"),
        ({"OPENAI_API_KEY": "sk-openai"}, None, "sk-openai"),
        ({"OPENAI_API_KEY": "sk-openai", "INTERLEAVE_API_KEY": "sk-ours"}, None, "sk-ours"),
        ({"INTERLEAVE_API_KEY": "sk-ours"}, "sk-given", "sk-given"),
    ],
)
def test_api_key_falls_back_from_argument_to_our_variable_to_openais_to_empty(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], explicit: str | None, expected: str
) -> None:
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    server = Server(httpx.Response(200, json=completion("hi")))
    model_for(server, api_key=explicit).invoke("hello")
    assert server.requests[0].headers["authorization"] == f"Bearer {expected}"


def test_served_model_is_a_chat_completions_chat_openai_with_a_stable_identity() -> None:
    model = model_for(Server(httpx.Response(200, json=completion("hi"))))
    assert isinstance(model, ChatOpenAI)
    assert model.use_responses_api is False
    assert model.max_retries == 6
    assert model_identity(model).startswith(f"openai-chat:{MODEL}")
    # The same model at another address is the same model; its label says where it is.
    other = model_for(Server(), base_url="http://other.test/v1")
    assert model_identity(model) == model_identity(other)
    assert model_label(model) != model_label(other)


def test_default_http_clients_are_built_offline() -> None:
    model = served_chat_model(MODEL, base_url=BASE_URL)
    assert isinstance(model, ChatOpenAI)
    # The SDK's own client classes, with our reply check added.
    assert isinstance(model.http_async_client, openai.DefaultAsyncHttpxClient)
    assert len(model.http_async_client.event_hooks["response"]) == 1


async def test_plan_reply_in_json_is_read_by_the_planner_parser() -> None:
    plan = {
        "execution_plan": [
            {
                "step_number": 1,
                "step_name": "Setting",
                "instruction": "Draw the harbour at dawn.",
                "prompt": "a quiet harbour at dawn, watercolour",
                "auxiliary_text": "The story starts at the harbour.",
            },
            {
                "step_number": 2,
                "step_name": "Boat",
                "instruction": "Add a red boat.",
                "prompt": "add a small red boat to the harbour",
                "auxiliary_text": None,
            },
        ]
    }
    server = Server(httpx.Response(200, json=completion(json.dumps(plan))))
    reply = await structured_binding(model_for(server), PlanAnswer, "plan").ainvoke("Tell a story.")

    parsed = parse_plan(reply.text, input_images=0, max_steps=10)
    assert [step.number for step in parsed.steps] == [1, 2]
    assert parsed.steps[0].prompt == "a quiet harbour at dawn, watercolour"
    assert parsed.steps[0].text == "The story starts at the harbour."
    assert parsed.steps[1].text is None
    # Without explicit sources a drawing step edits the previous image.
    assert parsed.steps[1].sources == ("step:1",)
    assert server.body()["response_format"]["json_schema"]["name"] == "plan"


async def test_streaming_replies_pass_the_reply_check() -> None:
    chunks = [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}
            ],
        }
        for piece in ("Hel", "lo")
    ]
    sse = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    server = Server(httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"}))
    text = "".join([chunk.text async for chunk in model_for(server).astream("hi")])
    assert text == "Hello"


# -- structured schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [PlanAnswer, VerdictAnswer])
def test_strict_schema_requires_every_field_and_forbids_others(schema: type) -> None:
    strict = strict_json_schema(schema)

    def check(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict):
                assert node["required"] == list(node["properties"])
                assert node["additionalProperties"] is False
            assert "default" not in node
            for value in node.values():
                check(value)
        elif isinstance(node, list):
            for value in node:
                check(value)

    check(strict)
    # The pydantic schema itself is left alone.
    assert "prompt" not in (PlanAnswer.model_json_schema()["$defs"]["PlannedStep"]["required"])


@pytest.mark.parametrize("schema", [PlanAnswer, VerdictAnswer])
def test_strict_schema_matches_what_the_openai_sdk_sends_for_the_class(schema: type) -> None:
    sdk = pytest.importorskip("openai.lib._pydantic")
    assert strict_json_schema(schema) == sdk.to_strict_json_schema(schema)


def test_length_bounds_can_be_dropped_and_strict_can_be_off() -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage("{}")]))
    bound = structured_binding(model, PlanAnswer, "plan", length_bounds=False)
    sent = bound.kwargs["response_format"]["json_schema"]
    assert "maxLength" not in json.dumps(sent["schema"])
    assert "maxItems" in json.dumps(sent["schema"])  # array and number bounds stay
    plain = structured_binding(model, VerdictAnswer, "verdict", strict=False).kwargs["response_format"]
    assert plain["json_schema"] == {
        "name": "verdict",
        "schema": VerdictAnswer.model_json_schema(),
        "strict": False,
    }


# -- retries and failures --------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_retries")
async def test_sdk_retries_429_and_500_then_succeeds() -> None:
    server = Server(
        httpx.Response(429, json={"error": {"message": "slow down"}}),
        httpx.Response(500, json={"error": {"message": "boom"}}),
        httpx.Response(200, json=completion("finally")),
    )
    reply = await model_for(server, max_retries=2).ainvoke("hi")
    assert reply.text == "finally"
    assert len(server.requests) == 3
    assert [r.headers["x-stainless-retry-count"] for r in server.requests] == ["0", "1", "2"]


@pytest.mark.usefixtures("fast_retries")
def test_sync_calls_retry_too() -> None:
    server = Server(httpx.Response(503), httpx.Response(200, json=completion("ok")))
    assert model_for(server, max_retries=1).invoke("hi").text == "ok"
    assert len(server.requests) == 2


@pytest.mark.usefixtures("fast_retries")
async def test_retries_run_out_into_the_sdk_error() -> None:
    server = Server(httpx.Response(500, json={"error": {"message": "still down"}}))
    with pytest.raises(openai.InternalServerError, match="still down"):
        await model_for(server, max_retries=2).ainvoke("hi")
    assert len(server.requests) == 3


async def test_bad_request_is_not_retried() -> None:
    server = Server(httpx.Response(400, json={"error": {"message": "bad schema"}}))
    with pytest.raises(openai.BadRequestError):
        await model_for(server).ainvoke("hi")
    assert len(server.requests) == 1


# Built per test: a response object is consumed by the request that gets it.
BROKEN_REPLIES: dict[str, tuple[dict[str, Any], str]] = {
    "invalid json": ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "not JSON"),
    "html page": ({"content": b"<html>login</html>", "headers": {"content-type": "text/html"}}, "not JSON"),
    "json list": ({"json": [1, 2]}, "not an object"),
    "missing choices": ({"json": {"id": "x", "object": "chat.completion"}}, "without choices"),
    "null choices": ({"json": {"id": "x", "choices": None}}, "without choices"),
    "empty choices": ({"json": {"id": "x", "choices": []}}, "without choices"),
    "choice without message": ({"json": {"choices": [{"index": 0}]}}, "no message"),
    "error object": ({"json": {"error": {"message": "model crashed"}}}, "model crashed"),
}


@pytest.mark.parametrize("structured", [False, True], ids=["plain", "structured"])
@pytest.mark.parametrize("name", list(BROKEN_REPLIES))
async def test_a_broken_200_reply_raises_a_clear_error(name: str, structured: bool) -> None:
    reply, words = BROKEN_REPLIES[name]
    server = Server(httpx.Response(200, **reply))
    model = model_for(server)
    runnable = structured_binding(model, VerdictAnswer, "verdict") if structured else model
    with pytest.raises(MalformedResponseError, match=words) as caught:
        await runnable.ainvoke("hi")
    assert BASE_URL in str(caught.value)
    assert "base_url" in caught.value.hint
    assert len(server.requests) == 1


def test_a_broken_reply_is_caught_on_sync_calls_too() -> None:
    server = Server(httpx.Response(200, json={"object": "chat.completion"}))
    with pytest.raises(MalformedResponseError, match="without choices"):
        model_for(server).invoke("hi")


# -- construction routes ---------------------------------------------------------------------------


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="max_retries"):
        served_chat_model(MODEL, base_url=BASE_URL, max_retries=-1)
    with pytest.raises(ConfigurationError, match="timeout"):
        served_chat_model(MODEL, base_url=BASE_URL, timeout=0)


def test_openai_prefix_without_base_url_builds_chat_openai_and_needs_a_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigurationError, match="no API key") as caught:
        served_chat_model("openai:gpt-5")
    assert "OPENAI_API_KEY" in caught.value.hint
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    model = served_chat_model("openai:gpt-5", timeout=30.0)
    assert isinstance(model, ChatOpenAI)
    assert model.model_name == "gpt-5"
    assert model.openai_api_base is None
    assert model.request_timeout == 30.0


def test_other_providers_need_langchain(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes the import fail as if langchain were not installed.
    monkeypatch.setitem(sys.modules, "langchain", None)
    monkeypatch.setitem(sys.modules, "langchain.chat_models", None)
    with pytest.raises(ConfigurationError, match="init_chat_model") as caught:
        served_chat_model("google_genai:gemini-2.5-flash")
    assert "pip install langchain" in caught.value.hint


def fake_langchain(monkeypatch: pytest.MonkeyPatch, init: Callable[..., Any]) -> None:
    package = types.ModuleType("langchain")
    chat_models = types.ModuleType("langchain.chat_models")
    chat_models.init_chat_model = init  # type: ignore[attr-defined]
    package.chat_models = chat_models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "langchain", package)
    monkeypatch.setitem(sys.modules, "langchain.chat_models", chat_models)


def test_other_providers_go_through_init_chat_model_with_our_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    built = GenericFakeChatModel(messages=iter([AIMessage("hi")]))

    def init_chat_model(model: str, **kwargs: Any) -> BaseChatModel:
        calls.append((model, kwargs))
        return built

    fake_langchain(monkeypatch, init_chat_model)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")  # not forwarded: Gemini reads its own variable
    assert served_chat_model("google_genai:gemini-2.5-flash", timeout=60.0, max_retries=3) is built
    assert calls == [
        ("google_genai:gemini-2.5-flash", {"timeout": 60.0, "max_retries": 3})
    ]
    served_chat_model("anthropic:claude-x", api_key="sk-ant", max_tokens=100)
    assert calls[-1][1]["api_key"] == "sk-ant"
    assert calls[-1][1]["max_tokens"] == 100


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (ValueError("Unsupported model_provider='nope'"), "cannot build"),
        (ImportError("Unable to import langchain_google_genai"), "not installed"),
    ],
)
def test_init_chat_model_failures_become_configuration_errors(
    monkeypatch: pytest.MonkeyPatch, error: Exception, words: str
) -> None:
    def init_chat_model(model: str, **kwargs: Any) -> BaseChatModel:
        raise error

    fake_langchain(monkeypatch, init_chat_model)
    with pytest.raises(ConfigurationError, match=words):
        served_chat_model("nope:model")


async def test_sampling_knobs_the_user_set_are_sent_and_top_k_goes_in_the_body() -> None:
    server = Server(httpx.Response(200, json=completion("<answer>{}</answer>")))
    model = model_for(server, temperature=0.7, top_p=0.8, top_k=20)
    await model.ainvoke([HumanMessage(content="hi")])
    body = server.body()
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.7, 0.8, 20)
