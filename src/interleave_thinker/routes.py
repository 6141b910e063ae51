"""HTTP routes beside the agent server's API, for what a thread's state only references.

- ``GET /interleave/images/{sha256}``: a stored image, verified against its hash.
- ``POST /interleave/images``: store the image in the body (a still PNG, JPEG or WebP), normalised
  as the CLI's input images are; returns its ImageRef, to pass in a run's ``images`` input.
- ``GET /interleave/threads/{thread_id}/document``: the HTML page of a finished thread.

Two forms of the same handlers: a Starlette app (``langgraph dev``, via ``server.app``) and a
FastAPI app (Aegra, via ``aegra.app``; Aegra mounts only FastAPI apps and applies its
authentication to FastAPI routes only). Both servers put their own authentication in front of
these routes when ``http.enable_custom_route_auth`` is set, as ``langgraph.json`` and
``aegra.json`` do.

Memory stays bounded under load: an upload is read in chunks up to ``MAX_IMAGE_BYTES`` (a
larger ``Content-Length`` is refused before reading), and at most ``$INTERLEAVE_MAX_UPLOADS``
(default 4) uploads are read and decoded at once; others wait for a turn, up to
``UPLOAD_WAIT_S``, then get 503. Error bodies name no server path.
"""

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from interleave_thinker.errors import ConfigurationError, ImageError, InterleaveError, StorageError
from interleave_thinker.server import ROUTE_PREFIX, hide_paths, server_workspace
from interleave_thinker.state import ImageRef
from interleave_thinker.storage.image_store import MAX_IMAGE_BYTES

MAX_UPLOADS_ENV = "INTERLEAVE_MAX_UPLOADS"
DEFAULT_MAX_UPLOADS = 4
# How long an upload waits for a free turn before it is told to come back later.
UPLOAD_WAIT_S = 60.0
IMAGE_PATH = f"{ROUTE_PREFIX}/images/{{sha256}}"
UPLOAD_PATH = f"{ROUTE_PREFIX}/images"
DOCUMENT_PATH = f"{ROUTE_PREFIX}/threads/{{thread_id}}/document"


def _error(status: int, error: InterleaveError | str, hint: str = "") -> JSONResponse:
    message = error.message if isinstance(error, InterleaveError) else error
    hint = error.hint if isinstance(error, InterleaveError) else hint
    body = {"detail": hide_paths(message)}
    if hint:
        body["hint"] = hide_paths(hint)
    return JSONResponse(body, status_code=status)


def _max_uploads() -> int:
    raw = os.environ.get(MAX_UPLOADS_ENV, "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_MAX_UPLOADS
    except ValueError:
        return DEFAULT_MAX_UPLOADS


class Routes:
    """The handlers, with the upload gate their app shares."""

    def __init__(self, max_uploads: int | None = None) -> None:
        self.uploads = asyncio.Semaphore(max_uploads or _max_uploads())

    async def image(self, sha256: str) -> Response:
        workspace = await server_workspace()

        def read() -> tuple[ImageRef, bytes]:
            ref = workspace.image_store.find(sha256)
            return ref, workspace.image_store.read(ref)

        try:
            ref, data = await asyncio.to_thread(read)
        except ImageError as exc:
            return _error(404, exc)
        except StorageError as exc:
            return _error(503, exc)
        # Content-addressed: the bytes behind a hash never change.
        headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{ref.sha256}"'}
        return Response(data, media_type=ref.media_type, headers=headers)

    async def upload(self, request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
            return _too_large()
        try:
            await asyncio.wait_for(self.uploads.acquire(), UPLOAD_WAIT_S)
        except TimeoutError:
            return JSONResponse(
                {"detail": "too many uploads at once; try again shortly"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        try:
            body = bytearray()
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > MAX_IMAGE_BYTES:
                    return _too_large()
            workspace = await server_workspace()
            try:
                ref = await asyncio.to_thread(
                    # Stored as the models will see it (upright, 8-bit RGB, opaque); the returned
                    # reference names the stored image, which may differ from the bytes sent.
                    workspace.image_store.put_input, bytes(body), what="uploaded image"
                )
            except ImageError as exc:
                return _error(400, exc)
            except StorageError as exc:
                return _error(503, exc)
            finally:
                del body
        finally:
            self.uploads.release()
        return JSONResponse(ref.model_dump(mode="json"), status_code=201)

    async def document(self, thread_id: str) -> Response:
        workspace = await server_workspace()
        try:
            path = workspace.document_path(thread_id)
        except ConfigurationError as exc:
            return _error(400, exc)
        try:
            html = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return _error(404, "no document for this thread: it is unknown or has not finished")
        except OSError:
            return _error(500, "the document page could not be read")
        return HTMLResponse(html)


def _too_large() -> JSONResponse:
    return _error(413, f"the image is over the {MAX_IMAGE_BYTES} byte limit")


def make_starlette_app(max_uploads: int | None = None) -> Starlette:
    """The routes as a Starlette app, for ``langgraph dev`` (``langgraph.json``'s ``http.app``)."""
    routes = Routes(max_uploads)

    async def image(request: Request) -> Response:
        return await routes.image(request.path_params["sha256"])

    async def document(request: Request) -> Response:
        return await routes.document(request.path_params["thread_id"])

    return Starlette(
        routes=[
            Route(IMAGE_PATH, image, methods=["GET"]),
            Route(UPLOAD_PATH, routes.upload, methods=["POST"]),
            Route(DOCUMENT_PATH, document, methods=["GET"]),
        ]
    )


def make_fastapi_app(max_uploads: int | None = None) -> Any:
    """The routes as a FastAPI app, for Aegra (``aegra.json``'s ``http.app``): its API routes
    take the server's authentication dependency when ``enable_custom_route_auth`` is set."""
    from fastapi import FastAPI

    routes = Routes(max_uploads)
    app = FastAPI(title="interleave-thinker routes", openapi_tags=[{"name": "interleave"}])

    async def get_image(sha256: str) -> Response:
        """A stored image by its sha256, verified against the hash."""
        return await routes.image(sha256)

    async def upload_image(request: Request) -> Response:
        """Store the PNG, JPEG or WebP image in the body; returns its ImageRef."""
        return await routes.upload(request)

    async def get_document(thread_id: str) -> Response:
        """The HTML page of a finished thread."""
        return await routes.document(thread_id)

    tags: list[str | Any] = ["interleave"]
    app.add_api_route(IMAGE_PATH, get_image, methods=["GET"], tags=tags)
    app.add_api_route(UPLOAD_PATH, upload_image, methods=["POST"], status_code=201, tags=tags)
    app.add_api_route(DOCUMENT_PATH, get_document, methods=["GET"], tags=tags)
    return app
