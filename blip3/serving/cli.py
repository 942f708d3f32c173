"""`blip3 serve` and `blip3 chat`, added to the `blip3` command (see `COMMAND_MODULES` in blip3/cli.py)."""

from __future__ import annotations

import argparse
import os
import sys

from blip3.serving.media import MediaPolicy

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_commands(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible server (chat completions, streaming, images) with a chat page",
        description="Serve a model over HTTP: POST /v1/chat/completions, GET /v1/models, GET /health, and a "
        "chat page at /. The API key is read from --api-key or the BLIP3_API_KEY environment variable.",
    )
    serve.add_argument("checkpoint", help="checkpoint folder or hub id (official xGen-MM or blip3)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model-name", help="the model id clients use (default: the checkpoint folder's name)")
    serve.add_argument("--api-key", default=os.environ.get("BLIP3_API_KEY"), help="require 'Authorization: Bearer KEY'")
    _add_model_arguments(serve)
    batching = serve.add_argument_group("batching")
    batching.add_argument("--max-batch-size", type=int, default=16, help="rows per generate call (1: no batching)")
    batching.add_argument(
        "--batch-window-ms",
        type=float,
        default=50.0,
        help="the longest a batch waits for requests still being prepared",
    )
    batching.add_argument("--max-pending", type=int, default=256, help="queued requests beyond this get a 503")
    limits = serve.add_argument_group("limits")
    limits.add_argument("--default-max-tokens", type=int, default=256)
    limits.add_argument("--max-tokens-limit", type=int, default=2048, help="the most max_tokens a request may ask")
    limits.add_argument("--max-request-bytes", type=int, default=32 * 2**20)
    limits.add_argument("--max-images", type=int, default=8, help="images per request, history included")
    limits.add_argument("--max-image-bytes", type=int, default=MediaPolicy.max_image_bytes)
    limits.add_argument("--max-image-pixels", type=int, default=MediaPolicy.max_image_pixels)
    limits.add_argument(
        "--media-timeout", type=float, default=30.0, help="seconds to fetch and decode a request's images"
    )
    remote = serve.add_argument_group("remote images (off unless --allow-remote-images)")
    remote.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs from the allowed domains"
    )
    remote.add_argument(
        "--allowed-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="example.com, *.example.com, or * for any public host (repeatable)",
    )
    remote.add_argument("--fetch-timeout", type=float, default=MediaPolicy.fetch_timeout_s)
    serve.add_argument("--no-web-page", action="store_true", help="do not serve the chat page at /")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=cmd_serve)

    chat = commands.add_parser("chat", help="chat with a model in the terminal (images with /image PATH)")
    chat.add_argument("checkpoint", help="checkpoint folder or hub id (official xGen-MM or blip3)")
    _add_model_arguments(chat)
    chat.add_argument("--max-tokens", type=int, default=256, help="per answer")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--system", help="system prompt (default: the xGen-MM one)")
    chat.set_defaults(run=cmd_chat)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the stored dtype")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a busy shared machine)"
    )


def _load(args):
    import torch

    from blip3.factory import load_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else "auto"
    model, processor = load_pretrained(args.checkpoint, dtype=dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def settings_from_args(args):
    from blip3.serving.app import ServeSettings

    return ServeSettings(
        model_name=args.model_name or os.path.basename(os.path.normpath(args.checkpoint)),
        api_key=args.api_key or None,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000,
        max_pending=args.max_pending,
        default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        max_images_per_request=args.max_images,
        media_timeout_s=args.media_timeout,
        media=MediaPolicy(
            max_image_bytes=args.max_image_bytes,
            max_image_pixels=args.max_image_pixels,
            allow_remote=args.allow_remote_images,
            allowed_domains=tuple(args.allowed_domain),
            fetch_timeout_s=args.fetch_timeout,
        ),
        web_page=not args.no_web_page,
    )


def cmd_serve(args) -> None:
    import uvicorn

    from blip3.serving.app import create_app

    settings = settings_from_args(args)
    if settings.media.allow_remote and not settings.media.allowed_domains:
        raise SystemExit("blip3 serve: --allow-remote-images needs at least one --allowed-domain (or '*')")
    if args.host not in LOOPBACK_HOSTS and settings.api_key is None:
        print(f"warning: listening on {args.host} without an API key (set BLIP3_API_KEY)", file=sys.stderr)
    model, processor = _load(args)
    app = create_app(model, processor, settings)
    print(f"serving {settings.model_name!r} at http://{args.host}:{args.port}/ (API under /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)


def cmd_chat(args) -> None:
    from blip3.serving.chat import TerminalChat

    model, processor = _load(args)
    TerminalChat(
        model,
        processor,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        system=args.system,
    ).run()
