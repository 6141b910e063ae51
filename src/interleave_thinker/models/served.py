"""Chat models behind an OpenAI-compatible server (vLLM, OpenAI) or any provider init_chat_model knows."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from interleave_thinker.errors import ConfigurationError, InterleaveError, one_line
from interleave_thinker.settings import API_KEY_ENV, find_api_key, redact_url

__all__ = [
    "API_KEY_ENV",
    "MalformedResponseError",
    "served_chat_model",
    "strict_json_schema",
    "structured_binding",
]

INSTALL_HINT = "install the served-model extra: pip install 'interleave-thinker[openai]'"
_LENGTH_KEYWORDS = ("minLength", "maxLength")


class MalformedResponseError(InterleaveError):
    """A chat server answered 200 with a body that is not a chat completion."""


def served_chat_model(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 300.0,
    max_retries: int = 6,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    extra_body: dict[str, Any] | None = None,
    http_client: Any = None,
    http_async_client: Any = None,
) -> BaseChatModel:
    """A chat model for ``model`` served over HTTP.

    With ``base_url`` (a vLLM or other OpenAI-compatible ``/v1`` endpoint): a ``ChatOpenAI`` on
    Chat Completions; server-specific sampling fields (``top_k``, ``repetition_penalty``,
    ``chat_template_kwargs``) go in ``extra_body`` and are merged into the request body. The key
    is ``api_key``, else ``$INTERLEAVE_API_KEY``, else ``$OPENAI_API_KEY``, else ``"EMPTY"``
    (what vLLM expects when it runs without ``--api-key``).

    Without ``base_url``: ``openai:NAME`` is built the same way against api.openai.com (a key
    is then required); any other ``provider:NAME`` goes to LangChain's ``init_chat_model``
    (the ``langchain`` package), with the same timeout, retries and sampling settings.

    The openai SDK retries connection errors, timeouts, 408, 409, 429 and 5xx itself, up to
    ``max_retries`` times with exponential backoff (0.5 s doubling to 8 s, or the server's
    ``Retry-After``). A 200 whose body is not a chat completion raises ``MalformedResponseError``.
    """
    if max_retries < 0:
        raise ConfigurationError(f"max_retries must be 0 or more, not {max_retries}")
    if top_k is not None:
        # Not an OpenAI parameter: vLLM reads it from the request body.
        extra_body = {**(extra_body or {}), "top_k": top_k}
    if timeout <= 0:
        raise ConfigurationError(f"timeout must be positive, not {timeout}")
    provider, _, name = model.partition(":")
    if base_url is None and not (name and provider == "openai"):
        return _init_chat_model(
            model,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            extra_body=extra_body,
            http_client=http_client,
            http_async_client=http_async_client,
        )
    if base_url is None:
        model = name
        key = find_api_key(api_key)
        if not key:
            raise ConfigurationError(
                f"no API key for OpenAI model {model!r}",
                hint="set INTERLEAVE_API_KEY or OPENAI_API_KEY, or pass api_key",
            )
    else:
        key = find_api_key(api_key) or "EMPTY"
    ChatOpenAI = _chat_openai_class()
    return ChatOpenAI(
        model=model,
        base_url=base_url,
        api_key=key,
        # Chat Completions is what vLLM serves, and what response_format binds are written for.
        use_responses_api=False,
        timeout=timeout,
        max_retries=max_retries,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        extra_body=extra_body,
        http_client=_checked_sync_client(http_client),
        http_async_client=_checked_async_client(http_async_client),
        # Both clients are ours, so ChatOpenAI's socket options would go unused; () also skips
        # the socket it opens to probe them.
        http_socket_options=(),
    )


def structured_binding(
    model: BaseChatModel,
    schema: type[BaseModel],
    name: str,
    *,
    strict: bool = True,
    length_bounds: bool = True,
) -> Runnable:
    """``model`` bound to answer as JSON matching ``schema`` (OpenAI ``response_format`` json_schema).

    The reply text is then JSON, which ``parse_plan`` / ``parse_verdict`` read like any answer.
    Models that read ``response_format`` take it: ChatOpenAI (served or OpenAI) and the
    in-process transformers model; other providers' classes may not. Compute ``model_identity``
    from ``model``, not from the binding.
    With ``strict`` the schema is the strict-mode copy (``strict_json_schema``) OpenAI requires;
    vLLM and the in-process grammar accept it too. ``length_bounds=False`` drops minLength and
    maxLength for providers that refuse them in strict mode (fine-tuned OpenAI models); keep them
    for vLLM, where they keep a rambling model's strings finite.
    """
    if strict:
        body = strict_json_schema(schema, length_bounds=length_bounds)
    else:
        body = _without(schema.model_json_schema(), () if length_bounds else _LENGTH_KEYWORDS)
    return model.bind(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": body, "strict": strict},
        }
    )


def strict_json_schema(schema: type[BaseModel], *, length_bounds: bool = True) -> dict[str, Any]:
    """A copy of ``schema``'s JSON schema that OpenAI's strict mode accepts.

    Every object lists all its properties as required and forbids others; optional fields keep
    their ``null`` alternative, so the model writes ``null`` where it would have left a key out.
    Defaults go (strict mode has no use for them) and ``$ref`` siblings are inlined, as the openai
    SDK does for the pydantic classes it is given.
    """
    root = copy.deepcopy(schema.model_json_schema())
    drop = () if length_bounds else _LENGTH_KEYWORDS
    return _strict(root, root, drop)


# -- chat model construction -----------------------------------------------------------------------


def _chat_openai_class() -> Any:
    try:
        from langchain_openai import ChatOpenAI
    except ImportError as exc:
        raise ConfigurationError("served chat models need langchain-openai", hint=INSTALL_HINT) from exc
    return ChatOpenAI


def _init_chat_model(model: str, *, api_key: str | None, **settings: Any) -> BaseChatModel:
    try:
        from langchain.chat_models import init_chat_model
    except ImportError as exc:
        raise ConfigurationError(
            f"model {model!r} has no base_url, so it needs LangChain's init_chat_model, "
            "which is in the langchain package",
            hint="pip install langchain (and the provider's package, e.g. langchain-google-genai), "
            "or pass base_url for an OpenAI-compatible server",
        ) from exc
    kwargs = {key: value for key, value in settings.items() if value is not None}
    if api_key:
        # Only an explicit key: each provider reads its own variable (GOOGLE_API_KEY, ...).
        kwargs["api_key"] = api_key
    try:
        return init_chat_model(model, **kwargs)
    except ImportError as exc:
        raise ConfigurationError(
            f"the provider of {model!r} is not installed: {one_line(exc)}",
            hint="install the provider's LangChain package named in the message",
        ) from exc
    except ValueError as exc:
        raise ConfigurationError(
            f"init_chat_model cannot build {model!r}: {one_line(exc)}",
            hint="write the model as provider:name (openai:gpt-5, google_genai:gemini-2.5-flash) "
            "or pass base_url for an OpenAI-compatible server",
        ) from exc


def _checked_async_client(client: Any) -> Any:
    client = client if client is not None else _default_client(asynchronous=True)
    _add_hook(client, _check_chat_response_async)
    return client


def _checked_sync_client(client: Any) -> Any:
    client = client if client is not None else _default_client(asynchronous=False)
    _add_hook(client, _check_chat_response)
    return client


def _default_client(*, asynchronous: bool) -> Any:
    import openai

    # The SDK's own client class keeps its connection limits, timeouts and redirects.
    return openai.DefaultAsyncHttpxClient() if asynchronous else openai.DefaultHttpxClient()


def _add_hook(client: Any, hook: Any) -> None:
    hooks = dict(client.event_hooks)
    response_hooks = list(hooks.get("response", []))
    if hook not in response_hooks:
        hooks["response"] = [*response_hooks, hook]
        client.event_hooks = hooks


# -- response checks (HTTP response hooks) ---------------------------------------------------------
# ChatOpenAI turns a broken 200 body into a bare TypeError or AttributeError (with response_format
# bound: "'NoneType' object is not iterable"); checking at the wire names the real problem.


def _check_chat_response(response: Any) -> None:
    if _needs_check(response):
        response.read()
        _check_body(response)


async def _check_chat_response_async(response: Any) -> None:
    if _needs_check(response):
        await response.aread()
        _check_body(response)


def _needs_check(response: Any) -> bool:
    request = response.request
    if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
        return False
    content_type = response.headers.get("content-type", "")
    # Error statuses are the SDK's to report; streams are checked chunk by chunk by ChatOpenAI.
    return response.status_code == 200 and not content_type.startswith("text/event-stream")


def _check_body(response: Any) -> None:
    where = redact_url(str(response.request.url))
    hint = "check that base_url is the server's OpenAI-compatible /v1 endpoint and that it is healthy"
    try:
        data = json.loads(response.content)
    except ValueError:
        raise MalformedResponseError(
            f"{where} answered 200 with a body that is not JSON: {_preview(response.content)}", hint=hint
        ) from None
    if not isinstance(data, dict):
        raise MalformedResponseError(
            f"{where} answered 200 with JSON that is not an object: {_preview(response.content)}",
            hint=hint,
        )
    if data.get("error"):
        raise MalformedResponseError(f"{where} answered 200 with an error: {data['error']}", hint=hint)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponseError(
            f"{where} answered 200 without choices (keys: {', '.join(map(str, data)) or 'none'})",
            hint=hint,
        )
    if not all(isinstance(choice, dict) and isinstance(choice.get("message"), dict) for choice in choices):
        raise MalformedResponseError(f"{where} answered 200 with a choice that has no message", hint=hint)


def _preview(content: bytes, limit: int = 120) -> str:
    text = content.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# -- schemas ---------------------------------------------------------------------------------------


def _strict(node: Any, root: dict[str, Any], drop: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_strict(item, root, drop) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node and len(node) > 1:
        # A $ref with siblings (a description, say) is refused: inline what it points to.
        ref = node["$ref"]
        merged = {**_resolve(root, ref), **{k: v for k, v in node.items() if k != "$ref"}}
        return _strict(merged, root, drop)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "default" or key in drop:
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _strict(sub, root, drop) for name, sub in value.items()}
        else:
            out[key] = _strict(value, root, drop)
    if isinstance(out.get("properties"), dict):
        out["required"] = list(out["properties"])
    if out.get("type") == "object":
        out.setdefault("additionalProperties", False)
    return out


def _resolve(root: Mapping[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ConfigurationError(f"cannot inline the schema reference {ref!r}", hint="use local $defs")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return dict(node)


def _without(node: Any, drop: tuple[str, ...]) -> Any:
    if not drop:
        return node
    if isinstance(node, list):
        return [_without(item, drop) for item in node]
    if isinstance(node, dict):
        # Keys inside "properties" are field names, not keywords: only drop keywords.
        return {
            key: (
                {name: _without(sub, drop) for name, sub in value.items()}
                if key in ("properties", "$defs", "definitions") and isinstance(value, dict)
                else _without(value, drop)
            )
            for key, value in node.items()
            if key not in drop
        }
    return node
