"""`latentformer ui`: the Streamlit playground (`latentformer.serve.ui_app`) on 127.0.0.1.

The arguments are checked here, before Streamlit starts (a bad PATH or URL is one line and
exit 1); then `streamlit run` runs the app in a child process, headless, bound to loopback, with
usage statistics, the file watcher and the developer toolbar off: nothing calls out. The server's
API key reaches the child in its environment (LATENTFORMER_API_KEY), never on its command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import urlparse

from latentformer.cli.generate import add_model_arguments, check_device
from latentformer.cli.serve import API_KEY_ENV, add_api_key_arguments, api_key

HELP = "a web playground for a checkpoint or a running server (Streamlit, on 127.0.0.1)"

HOST = "127.0.0.1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, path_optional=True)
    parser.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default: 8501)")
    parser.add_argument("--server", metavar="URL", default=None,
                        help="generate with a running `latentformer serve` at URL instead (PATH then only feeds the model card)")
    add_api_key_arguments(parser, f"the server's API key, with --server (default: ${API_KEY_ENV})")


def streamlit_command(args: argparse.Namespace) -> list[str]:
    """The `streamlit run` command line for `args` (already checked)."""
    app = Path(__file__).resolve().parent.parent / "serve" / "ui_app.py"
    flags = {"server.address": HOST, "server.port": args.port, "server.headless": "true",
             "browser.gatherUsageStats": "false", "server.fileWatcherType": "none", "server.runOnSave": "false",
             "client.toolbarMode": "minimal", "global.developmentMode": "false"}
    app_args = [str(Path(args.path).resolve())] if args.path else []
    for name in ("server", "device", "dtype"):
        if getattr(args, name):
            app_args += [f"--{name.replace('_', '-')}", getattr(args, name)]
    return [sys.executable, "-m", "streamlit", "run", *(f"--{k}={v}" for k, v in flags.items()), str(app), "--", *app_args]


def streamlit_env(args: argparse.Namespace) -> dict[str, str]:
    """The child's environment: ours, with the API key of --api-key / --api-key-file / the environment."""
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    key = api_key(args)
    return env | ({API_KEY_ENV: key} if key else {})


def check_args(args: argparse.Namespace) -> None:
    """ValueError/FileNotFoundError for what would fail inside the page."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.server:
        url = urlparse(args.server)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"--server must be an http(s) URL such as http://127.0.0.1:8000, got {args.server!r}")
    elif args.path is None:
        raise ValueError("give a checkpoint or run directory, or --server URL")
    if args.device is not None:
        check_device(args.device)
    if args.path is not None:
        from latentformer.checkpoint import WEIGHTS, find_checkpoint, read_config

        ckpt = find_checkpoint(args.path)
        read_config(ckpt)
        if not args.server and not (ckpt / WEIGHTS).is_file():
            raise ValueError(f"{ckpt} has no {WEIGHTS}")
    if find_spec("streamlit") is None:
        raise ValueError("the ui needs Streamlit: pip install 'latentformer[ui]'")
    if args.server and find_spec("openai") is None:
        raise ValueError("--server needs the openai client: pip install 'latentformer[ui]'")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    print(f"latentformer ui: http://{HOST}:{args.port} (Ctrl-C stops)", flush=True)
    child = subprocess.Popen(streamlit_command(args), env=streamlit_env(args))
    # SIGTERM to this process ends the app too (Ctrl-C reaches both: they share the terminal)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.wait()
        raise
