"""`latentformer serve`: an OpenAI-compatible HTTP server with continuous batching.

The listening socket is bound before the model loads, so a port in use fails at once (one line,
exit 1). The engine runs in a child process (`latentformer.serve.worker`), this one serves HTTP;
with `--api-processes N`, N - 1 more processes serve HTTP on the same socket, each with its own
channel to the one engine. If the engine process dies, the server stops and exits 1 with one line
(for a supervisor to restart it). The API key comes from LATENTFORMER_API_KEY, `--api-key-file`
or `--api-key` (visible in `ps`), and is never put on a child's command line. Each request is one
line on stderr. Needs the `[serve]` extra (fastapi, uvicorn, prometheus-client).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import sys
from pathlib import Path

from latentformer.cli.generate import add_model_arguments

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, streaming; continuous batching)"
API_KEY_ENV = "LATENTFORMER_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    add_api_key_arguments(parser, f"require 'Authorization: Bearer KEY' on every request but /health (default: ${API_KEY_ENV}, "
                                  "else none)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="rows of the decode batch, preallocated in the cache (default: 4 on a CPU, 16 on a GPU, fewer when "
                             "the cache would take over 25%% of the available memory, or 50%% of the free GPU memory)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a row; beyond, 429 (default: 256)")
    parser.add_argument("--stream-interval", type=float, default=0.0, metavar="MS",
                        help="coalesce a stream's tokens into one chunk per MS milliseconds (the first token is sent at once; "
                             "default: 0, a chunk per token). Under load a chunk per token costs the server more than the model")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the checkpoint directory's name)")
    parser.add_argument("--api-processes", type=int, default=None, metavar="N",
                        help="processes serving HTTP on the port, all feeding one engine (default: 1 on a CPU; on a GPU one "
                             "per 4 cores, up to 4). One process streams some tens of thousands of chunks/s; many concurrent "
                             "streams of a fast model need more")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step and replay it as a CUDA graph (CUDA only)")
    parser.add_argument("--drain", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM/Ctrl-C, time the requests in flight get to finish before they end with an error (default: 10)")
    parser.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="time a client has to send a whole request once it has started (default: 30)")
    parser.add_argument("--max-connections", type=int, default=1024, metavar="N",
                        help="open connections per HTTP process; a request beyond them gets 503 (default: 1024)")


def add_api_key_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """--api-key-file and --api-key (the environment's LATENTFORMER_API_KEY is the default)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--api-key-file", default=None, metavar="FILE", help=f"the API key, read from FILE: {help}")
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help=f"the API key itself; visible to every user in `ps`: prefer ${API_KEY_ENV} or --api-key-file")


def api_key(args: argparse.Namespace) -> str | None:
    """The API key of --api-key, --api-key-file or LATENTFORMER_API_KEY (in that order); None if none."""
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise OSError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror or e}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    if args.api_key is not None:
        if not args.api_key:
            raise ValueError("--api-key is empty")
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def _log_requests() -> None:
    """The server's log lines (one per request, refusals, internal errors) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("latentformer serve: %(message)s"))
    log = logging.getLogger("latentformer.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _open_files(connections: int) -> int:
    """Raise this process's open-file limit to its hard limit (each connection is a file); the
    connections that then fit, leaving room for the process's own files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return max(1, min(connections, soft - 128)) if soft != resource.RLIM_INFINITY else connections


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


def serve_http(app, engine, sock: socket.socket, limits: dict) -> int | None:
    """Run uvicorn on `app`, accepting on `sock` (shared by every HTTP process), until SIGINT/SIGTERM
    or until `engine`'s process is lost. Returns the exit status: 1 when the engine was lost,
    128 + the signal's number after SIGINT/SIGTERM, else None."""
    import threading

    from latentformer.serve.server import Server

    server, lost = Server(app, **limits), threading.Event()

    def on_lost() -> None:
        lost.set()
        server.should_exit = True

    engine.on_lost = on_lost
    server.run(sockets=[sock])
    if lost.is_set():
        return 1
    return 128 + server.signal if server.signal is not None else None


def _http_process(parent: int, sock: socket.socket, channel, path: str, name: str, api_key: str | None,
                  max_batch: int, max_queue: int, limits: dict) -> None:
    """One more HTTP process (spawned): the same app over its own channel to the engine. It stops
    (gracefully, SIGTERM) when the main process exits, also when that is by a signal."""
    import signal

    from latentformer.checkpoint import find_checkpoint
    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.procutil import die_with_parent
    from latentformer.serve.server import create_app
    from latentformer.serve.worker import EngineClient

    die_with_parent(parent, signal.SIGTERM)
    _log_requests()
    engine = EngineClient.connect(channel, load_tokenizer(find_checkpoint(path)), max_batch, max_queue)
    serve_http(create_app(engine, name, api_key=api_key), engine, sock, limits)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from latentformer.serve.server import create_app
    except ModuleNotFoundError as e:
        raise ValueError(f"serve needs the [serve] extra ({e.name} is missing): pip install 'latentformer[serve]'") from None
    if (args.max_batch is not None and args.max_batch < 1) or args.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch} and {args.max_queue}")
    if not (0 <= args.drain <= 3600 and 0 < args.read_timeout <= 3600):
        raise ValueError(f"--drain must be in [0, 3600] and --read-timeout in (0, 3600] seconds, got {args.drain:g} and "
                         f"{args.read_timeout:g}")
    if args.max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {args.max_connections}")
    key = api_key(args)
    if args.api_processes is None:
        from latentformer.serve.worker import default_http_processes

        args.api_processes = default_http_processes(args.device)
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
    app = create_app(engine, name, api_key=key)
    limits = dict(drain=args.drain, read_timeout=args.read_timeout, max_connections=_open_files(args.max_connections))
    ctx = multiprocessing.get_context("spawn")  # arguments travel pickled through a pipe, never on a command line
    others = [ctx.Process(target=_http_process, name=f"latentformer-http-{i + 1}", daemon=True,
                          args=(os.getpid(), sock, channel, str(args.path), name, key, engine.max_batch, args.max_queue, limits))
              for i, channel in enumerate(engine.channels)]
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    cfg, info = engine.config, engine.info
    kind = "chat template" if has_template(tokenizer) else "base model without a chat template: chat continues a plain 'User:/Assistant:' transcript"
    print(f"latentformer serve: {name} ({cfg.attention}, {info.params / 1e6:.1f}M parameters, {cfg.max_seq_len}-token context, "
          f"batch {engine.max_batch} ({info.sizing}), {info.cache_bytes / 2**20:.0f} MiB cache; {kind}"
          f"{f'; {args.api_processes} HTTP processes' if others else ''}) at http://{url_host}:{port}/v1", flush=True)
    if args.api_key is not None:
        print(f"latentformer serve: warning: --api-key shows the key to every user of this machine (ps); prefer "
              f"${API_KEY_ENV} or --api-key-file", file=sys.stderr, flush=True)
    _log_requests()
    for p, channel in zip(others, engine.channels):
        p.start()
        channel.close()
    try:
        status = serve_http(app, engine, sock, limits)
        if status == 1:  # a supervisor restarts the server; a live one failing every request helps nobody
            code = engine.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            print(f"latentformer serve: error: the engine process stopped ({how}); the server stops too",
                  file=sys.stderr, flush=True)
        return status or 0
    finally:
        for p in others:
            p.terminate()  # uvicorn's graceful shutdown, as on Ctrl-C
        for p in others:
            p.join(10)
            if p.is_alive():
                p.kill()
