"""`latentformer serve`: an OpenAI-compatible HTTP server with continuous batching.

The listening socket is bound before the model loads, so a port in use fails at once (one line,
exit 1). The engine runs in a child process (`latentformer.serve.worker`), this one serves HTTP;
with `--api-processes N`, N - 1 more processes serve HTTP on the same socket, each with its own
channel to the one engine. Needs the `[serve]` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
from pathlib import Path

from latentformer.cli.generate import add_model_arguments

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, streaming; continuous batching)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    parser.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--max-batch", type=int, default=16, help="rows of the decode batch, preallocated in the cache (default: 16)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a row; beyond, 429 (default: 256)")
    parser.add_argument("--stream-interval", type=float, default=0.0, metavar="MS",
                        help="coalesce a stream's tokens into one chunk per MS milliseconds (the first token is sent at once; "
                             "default: 0, a chunk per token). Under load a chunk per token costs the server more than the model")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the checkpoint directory's name)")
    parser.add_argument("--api-processes", type=int, default=1, metavar="N",
                        help="processes serving HTTP on the port, all feeding one engine (default: 1). One process "
                             "streams some tens of thousands of chunks/s; many concurrent streams of a fast model need more")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step and replay it as a CUDA graph (CUDA only)")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; OSError with the address when it cannot be had."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart quickly; a port in use still fails
        sock.bind((host, port))
        sock.listen(2048)  # early connections wait in the backlog until the server accepts them
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve_http(app, sock: socket.socket) -> None:
    """Run uvicorn on `app`, accepting on `sock` (shared by every HTTP process), until SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def _http_process(parent: int, sock: socket.socket, channel, path: str, name: str, api_key: str | None,
                  max_batch: int, max_queue: int) -> None:
    """One more HTTP process (spawned): the same app over its own channel to the engine. It stops
    (gracefully, SIGTERM) when the main process exits, also when that is by a signal."""
    import signal

    from latentformer.checkpoint import find_checkpoint
    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.procutil import die_with_parent
    from latentformer.serve.server import create_app
    from latentformer.serve.worker import EngineClient

    die_with_parent(parent, signal.SIGTERM)

    engine = EngineClient.connect(channel, load_tokenizer(find_checkpoint(path)), max_batch, max_queue)
    serve_http(create_app(engine, name, api_key=api_key), sock)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from latentformer.serve.server import create_app
    except ModuleNotFoundError as e:
        raise ValueError(f"serve needs the [serve] extra ({e.name} is missing): pip install 'latentformer[serve]'") from None
    if args.max_batch < 1 or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch} and {args.max_queue}")
    if not 1 <= args.api_processes <= 64:
        raise ValueError(f"--api-processes must be in [1, 64], got {args.api_processes}")
    if not 0 <= args.stream_interval <= 10_000:
        raise ValueError(f"--stream-interval must be in [0, 10000] milliseconds, got {args.stream_interval:g}")
    sock = listen(args.host, args.port)
    from latentformer.checkpoint import find_checkpoint
    from latentformer.cli.generate import check_device
    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.infer.chat import has_template
    from latentformer.serve.worker import EngineProcess, EngineSpec

    if args.device is not None:
        check_device(args.device)
    tokenizer = load_tokenizer(find_checkpoint(args.path))  # this process encodes prompts; the engine's loads the model
    spec = EngineSpec(str(args.path), args.device, args.dtype, args.max_batch, args.max_queue, args.compile,
                      args.stream_interval / 1000)
    engine = EngineProcess(spec, tokenizer, processes=args.api_processes)
    name = args.model_name or Path(args.path).resolve().name
    app = create_app(engine, name, api_key=args.api_key)
    ctx = multiprocessing.get_context("spawn")
    others = [ctx.Process(target=_http_process, name=f"latentformer-http-{i + 1}", daemon=True,
                          args=(os.getpid(), sock, channel, str(args.path), name, args.api_key, args.max_batch, args.max_queue))
              for i, channel in enumerate(engine.channels)]
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    cfg, info = engine.config, engine.info
    kind = "chat template" if has_template(tokenizer) else "base model without a chat template: chat continues a plain 'User:/Assistant:' transcript"
    print(f"latentformer serve: {name} ({cfg.attention}, {info.params / 1e6:.1f}M parameters, {cfg.max_seq_len}-token context, "
          f"batch {engine.max_batch}, {info.cache_bytes / 2**20:.0f} MiB cache; {kind}"
          f"{f'; {args.api_processes} HTTP processes' if others else ''}) at http://{url_host}:{port}/v1", flush=True)
    for p, channel in zip(others, engine.channels):
        p.start()
        channel.close()
    try:
        serve_http(app, sock)
    finally:
        for p in others:
            p.terminate()  # uvicorn's graceful shutdown, as on Ctrl-C
        for p in others:
            p.join(10)
            if p.is_alive():
                p.kill()
    return 0
