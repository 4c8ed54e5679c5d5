"""`rsd serve`: its options and start-up. Nothing heavy is imported until the command runs (`rsd --help` stays fast)."""

from __future__ import annotations

import argparse
import importlib
import os
import socket

from rsd.core import RSDError

SERVER_LIBRARIES = ("starlette", "uvicorn", "pydantic", "prometheus_client")
API_KEY_VARIABLE = "RSD_API_KEY"


def register(sub: argparse._SubParsersAction, add_model_arguments, add_decoding_arguments) -> None:
    parser = sub.add_parser(
        "serve", help="serve RSD behind an OpenAI-compatible HTTP API (default: the built-in tiny world)"
    )
    add_model_arguments(parser, required=False)
    add_decoding_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    group.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    group.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_VARIABLE})"
    )
    group.add_argument("--served-model-name", default="rsd", help="the model name clients send (default rsd)")
    group.add_argument(
        "--method",
        default="rsd",
        choices=("rsd", "draft", "target", "sd"),
        help="rsd, one model alone, or sd (the target alone with token-level speculation from the draft)",
    )
    group.add_argument("--max-concurrency", type=int, default=64, help="trajectories decoded at once (64)")
    group.add_argument("--max-queue", type=int, default=256, help="trajectories waiting beyond those; then 503 (256)")
    group.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request; 0: none (600)")
    group.add_argument("--grace-period", type=float, default=30.0, help="seconds to finish requests on SIGTERM (30)")
    group.add_argument("--max-n", type=int, default=8, help="most choices (n) per request (8)")
    group.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (1 MiB)")
    group.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    group.add_argument("--no-access-log", action="store_true", help="no log line per request")
    parser.set_defaults(func=cmd_serve)


def check_server_libraries() -> None:
    missing = []
    for name in SERVER_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RSDError(f"rsd serve needs {', '.join(missing)}: pip install 'rsd[serve]'")


def check_options(args: argparse.Namespace) -> None:
    for name in ("max_concurrency", "max_n", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise RSDError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("max_queue", "request_timeout", "grace_period"):
        if getattr(args, name) < 0:
            raise RSDError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}.")
    if not 0 < args.port < 65536:
        raise RSDError(f"--port {args.port}: give a port between 1 and 65535.")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise RSDError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pass another --port.") from None


def fill_models(args: argparse.Namespace) -> None:
    """No model arguments: the built-in tiny world's draft, target and PRM."""
    given = [args.draft, args.target, args.prm]
    if not any(given):
        args.draft = args.target = args.prm = "tinyworld"  # each role's built-in model
    elif not all(given):
        raise RSDError("pass all of --draft, --target and --prm, or none of them to serve the built-in tiny world.")


def cmd_serve(args: argparse.Namespace) -> int:
    check_server_libraries()
    check_options(args)  # before minutes of loading models
    from rsd.cli import build_rsd

    fill_models(args)
    app = build_app(build_rsd(args), args)
    print(f"rsd serve: {args.served_model_name} ({args.method}) on http://{args.host}:{args.port}/v1", flush=True)
    return run_server(app, args)


def build_app(rsd_models, args: argparse.Namespace):
    from rsd.controller import context_length
    from rsd.eval.prompts import load_template
    from rsd.serve.app import ServeOptions, create_app
    from rsd.serve.engine import make_engine
    from rsd.serve.requests import ServerLimits

    decoder = rsd_models.decoder(args.method)
    chat_model = rsd_models.draft if args.method == "draft" else rsd_models.target
    contexts = [c for g in decoder.generators if (c := context_length(g))]
    limits = ServerLimits(
        served_model_name=args.served_model_name,
        config=rsd_models.config,
        policy_name=rsd_models.policy.name,
        delta=args.delta,
        alpha=args.alpha,
        p=args.p,
        template=load_template(args.template),
        max_n=args.max_n,
        tokenizer=getattr(chat_model, "tokenizer", None),
    )
    options = ServeOptions(
        api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        context=min(contexts, default=None),
    )
    return create_app(make_engine(decoder, args.max_concurrency, args.max_queue), limits, options)


def run_server(app, args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C; then stop taking requests, finish those in flight (up to --grace-period)
    and return 0."""
    import asyncio
    import signal

    import uvicorn

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.grace_period,
    )
    server = uvicorn.Server(config)
    # uvicorn drains on the signal, then raises it again for the handler it found: a no-op one makes a drained
    # server's exit a normal one (0) instead of death by that signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    asyncio.run(server.serve())
    return 0 if server.started else 1
