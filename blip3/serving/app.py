"""The HTTP server: OpenAI's chat-completions API, a health check and a small chat page.

    GET  /                      the chat page (blip3/serving/web)
    GET  /health                {"status": "ok", ...}; no key needed
    GET  /v1/models             the one model served
    POST /v1/chat/completions   text + image_url parts; `stream: true` for server-sent events

A chat request goes through, in order: the API key; the body, read up to `max_request_bytes` (413
beyond); the JSON and its fields (400); the messages, text and images counted before any image is
touched; the images, fetched and decoded on a small thread pool within `media_timeout_s`; the
context length; then the scheduler (503 when its queue is full), which streams the answer back.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from blip3.modeling.model import Blip3ForConditionalGeneration
from blip3.processing.processor import Blip3Processor
from blip3.serving.engine import (
    BatchScheduler,
    Delta,
    Done,
    Event,
    Failed,
    GenerationRequest,
    QueueFull,
    SamplingParams,
)
from blip3.serving.media import MediaError, MediaLoader, MediaPolicy
from blip3.serving.prompts import (
    ParsedMessages,
    PreparedPrompt,
    PromptError,
    parse_messages,
    prepare_prompt,
    special_token_texts,
)
from blip3.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    model_card,
    new_completion_id,
    usage,
)

log = logging.getLogger("blip3.serving")

WEB_DIR = Path(__file__).resolve().parent / "web"
WEB_FILES = {"index.html": "text/html", "chat.js": "text/javascript", "chat.css": "text/css"}
# The page loads nothing from elsewhere and runs no inline script: model output can never become code.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass
class ServeSettings:
    """Everything `blip3 serve` can be told; the defaults are safe for a server on a private network."""

    model_name: str = "blip3"  # the model id clients name, listed by /v1/models
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    # batching
    max_batch_size: int = 16  # rows per generate call; 1 disables batching
    batch_window_s: float = 0.05  # the longest a batch waits for requests still being prepared
    max_pending: int = 256  # requests waiting for the model beyond this get a 503
    # generation
    default_max_tokens: int = 256  # when a request names none (and the context leaves room)
    max_tokens_limit: int = 2048  # the most a request may ask for
    # requests and media
    max_request_bytes: int = 32 * 2**20  # the whole JSON body, base64 images included
    max_images_per_request: int = 8  # over all messages, history included
    media_timeout_s: float = 30.0  # fetching and decoding all the images of one request
    media_workers: int = 4  # threads fetching and decoding images (requests beyond wait their turn)
    media: MediaPolicy = field(default_factory=MediaPolicy)
    web_page: bool = True  # serve the chat page at /


def create_app(
    model: Blip3ForConditionalGeneration,
    processor: Blip3Processor,
    settings: ServeSettings | None = None,
    media_loader: MediaLoader | None = None,
) -> FastAPI:
    """The FastAPI app for one model. The scheduler's worker thread runs for the app's lifespan."""
    settings = settings or ServeSettings()
    media_loader = media_loader or MediaLoader(settings.media)
    model.eval()
    scheduler = BatchScheduler(model, processor, settings.max_batch_size, settings.batch_window_s, settings.max_pending)
    media_pool = ThreadPoolExecutor(settings.media_workers, thread_name_prefix="blip3-media")
    forbidden_texts = special_token_texts(processor.tokenizer)
    context_length = model.config.text_config.max_position_embeddings
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            media_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="blip3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.scheduler = settings, scheduler

    # -- errors, all in OpenAI's shape ---------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(err)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

    async def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    # -- routes --------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "pending": scheduler.pending}

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(settings.model_name, started)]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(require_api_key)])
    async def get_model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(404, f"model {model_id!r} does not exist", "model", "model_not_found")
        return model_card(settings.model_name, started)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(request: Request):
        with scheduler.preparing():  # a batch about to start may wait for this request
            chat, generation, events = await admit(request)
        completion_id = new_completion_id()
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(
                stream_events(events, generation, completion_id, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            event = await events.get()  # not streamed: the answer comes whole, in Done
        finally:
            generation.cancel()  # no-op once done; stops the row if this handler is cancelled
        if isinstance(event, Failed):
            raise APIError(500, event.message, code="generation_failed")
        body = completion_body(
            completion_id,
            settings.model_name,
            event.text,
            event.finish_reason,
            generation.prompt.prompt_tokens,
            event.completion_tokens,
        )
        return JSONResponse(body)

    if settings.web_page:

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

        @app.get("/static/{name}", include_in_schema=False)
        async def page_asset(name: str) -> FileResponse:
            if name not in WEB_FILES:  # a fixed list: no path from the URL ever reaches the file system
                raise APIError(404, f"no such file: {name}")
            return FileResponse(WEB_DIR / name, media_type=WEB_FILES[name], headers=PAGE_HEADERS)

    # -- the steps of a chat request -----------------------------------------------------------------

    async def admit(request: Request) -> tuple[ChatCompletionRequest, GenerationRequest, asyncio.Queue[Event]]:
        """Every check, then the images and the prompt, then the scheduler's queue; any failure is an APIError."""
        chat = parse_request(await read_body(request, settings.max_request_bytes))
        requested_tokens = chat.max_completion_tokens or chat.max_tokens
        if requested_tokens is not None and requested_tokens > settings.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens is {requested_tokens}; this server allows at most {settings.max_tokens_limit}",
                "max_tokens",
            )
        try:
            parsed = parse_messages([m.model_dump() for m in chat.messages], forbidden_texts)
        except PromptError as err:
            raise APIError(400, str(err), err.param) from None
        if len(parsed.images) > settings.max_images_per_request:
            raise APIError(
                400,
                f"the request has {len(parsed.images)} images; this server takes at most "
                f"{settings.max_images_per_request} per request (history included)",
                "messages",
                "too_many_images",
            )
        prompt = await load_prompt(parsed)
        params = sampling_params(chat, prompt, requested_tokens)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731 (worker thread -> loop)
        generation = GenerationRequest(prompt, params, sink, stream=chat.stream)
        try:
            scheduler.submit(generation)
        except QueueFull as err:
            raise APIError(503, f"the server is busy ({err}); try again shortly", code="server_busy") from None
        return chat, generation, events

    def parse_request(body: bytes) -> ChatCompletionRequest:
        try:
            chat = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(part) for part in first["loc"]) or None
            raise APIError(400, f"{param or 'body'}: {first['msg']}", param) from None
        if chat.model != settings.model_name:
            raise APIError(
                404,
                f"model {chat.model!r} does not exist; this server serves {settings.model_name!r}",
                "model",
                "model_not_found",
            )
        if (unsupported := chat.unsupported()) is not None:
            raise APIError(400, unsupported[1], unsupported[0], "unsupported_parameter")
        return chat

    async def load_prompt(parsed: ParsedMessages) -> PreparedPrompt:
        """Fetch and decode the images and tokenise, off the event loop and within the media deadline."""

        def work() -> PreparedPrompt:
            images = []
            for number, ref in enumerate(parsed.images, start=1):
                try:
                    images.append(media_loader.load(ref.url))
                except MediaError as err:
                    raise PromptError(
                        f"image {number} ({ref.param}): {err}", f"{ref.param}.url", "invalid_image"
                    ) from None
            return prepare_prompt(processor, parsed.conversation, images)

        try:
            return await asyncio.wait_for(asyncio.wrap_future(media_pool.submit(work)), settings.media_timeout_s)
        except PromptError as err:
            raise APIError(400, str(err), err.param, err.code) from None
        except TimeoutError:
            raise APIError(
                400,
                f"the images took longer than {settings.media_timeout_s:g} s to fetch and decode",
                "messages",
                "media_timeout",
            ) from None

    def sampling_params(chat: ChatCompletionRequest, prompt: PreparedPrompt, requested: int | None) -> SamplingParams:
        room = context_length - prompt.prompt_tokens
        if requested is None and room >= 1:
            requested = min(settings.default_max_tokens, room)
        if requested is None or requested > room:
            raise APIError(
                400,
                f"this model's maximum context length is {context_length} tokens; the messages take "
                f"{prompt.prompt_tokens} ({prompt.vision_tokens} of them for images)"
                + (f" and max_tokens asks for {requested} more" if requested else ""),
                "messages",
                "context_length_exceeded",
            )
        defaults = model.generation_config  # a request that says nothing samples as the checkpoint says
        temperature = chat.temperature
        if temperature is None:
            temperature = (defaults.temperature or 1.0) if defaults.do_sample else 0.0
        top_p = chat.top_p if chat.top_p is not None else ((defaults.top_p or 1.0) if defaults.do_sample else 1.0)
        return SamplingParams(requested, temperature, top_p, chat.seed, chat.stop_strings)

    async def stream_events(
        events: asyncio.Queue[Event], generation: GenerationRequest, completion_id: str, include_usage: bool
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta, finish_reason=None) -> str:
            body = chunk_body(completion_id, settings.model_name, created, delta, finish_reason, None, include_usage)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    yield chunk({"content": event.text})
                    continue
                if isinstance(event, Done):
                    yield chunk({}, event.finish_reason)
                    if include_usage:
                        counts = usage(generation.prompt.prompt_tokens, event.completion_tokens)
                        body = chunk_body(completion_id, settings.model_name, created, None, None, counts, True)
                        yield f"data: {json.dumps(body)}\n\n"
                else:  # Failed: the status line is long gone, so the error travels as an event
                    yield f"data: {json.dumps(APIError(500, event.message, code='generation_failed').body())}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()  # the client may have gone: its row stops at the next step

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds chunked bodies, which declare no length
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
