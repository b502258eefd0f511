"""The `latentformer` command: one subcommand per verb, each in its own module.

A verb module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
User errors (ValueError, OSError, KeyboardInterrupt, and argparse's usage errors) become one
line on stderr and a non-zero exit; any other exception is one line too, marked as unexpected.
`LATENTFORMER_DEBUG=1` shows the full traceback instead.

A closed pipe is normal in a pipeline: stdout closed early (`latentformer info RUN | head -2`) ends
the command quietly with status 141 (128 + SIGPIPE, what a shell reports for a process ended by
it); stderr closed (`train ... 2>&1 | tee log`, then Ctrl-C, which ends `tee` too) only drops the
diagnostics, so the work in hand (a checkpoint save) still completes.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys

# verb -> module under latentformer.cli; a verb's heavy imports happen only when it runs
VERBS = {
    "prepare": "prepare",
    "tokenizer": "tokenizer",
    "train": "train",
    "finetune": "finetune",
    "eval": "evaluate",
    "generate": "generate",
    "chat": "chat",
    "convert": "convert",
    "info": "info",
    "serve": "serve",
    "ui": "ui",
    "compare": "compare",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (`latentformer VERB: error: ...`), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class StdoutClosed(BrokenPipeError):
    """The reader of stdout went away (`| head`): the command ends quietly."""


class _PipeStream:
    """sys.stdout / sys.stderr with a closed pipe handled. The first EPIPE points the descriptor at
    os.devnull (what is buffered or written later is dropped, the interpreter's final flush included);
    then stdout raises StdoutClosed, while stderr drops diagnostics instead of interrupting the work."""

    def __init__(self, stream, raises: bool) -> None:
        self._stream, self._raises = stream, raises

    def _closed(self, e: OSError) -> None:
        if e.errno != errno.EPIPE:
            raise e
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)
        if self._raises:
            raise StdoutClosed(errno.EPIPE, "stdout closed") from None

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._closed(e)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._closed(e)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="latentformer",
        description="Train, evaluate, compare and serve Multi-head Latent Attention language models.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, name in VERBS.items():
        mod = importlib.import_module(f"latentformer.cli.{name}")
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # verbs that take dotted config overrides (`--train.max_steps 100`) set `_overrides=True`
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if args.verb is None:
        parser.print_help()
        return 2
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PipeStream(sys.stdout, raises=True), _PipeStream(sys.stderr, raises=False)
    try:
        return _run(args)
    finally:
        sys.stdout, sys.stderr = streams


def _run(args: argparse.Namespace) -> int:
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a pipe closed early fails here, not in the interpreter's exit
        return code
    except StdoutClosed:
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print("latentformer: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("LATENTFORMER_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (ValueError, OSError)):  # not a user error: a bug, or a case no check foresaw
            msg = f"unexpected {type(e).__name__}: {msg} (LATENTFORMER_DEBUG=1 shows the traceback)"
        print(f"latentformer {args.verb}: error: {msg}", file=sys.stderr)
        return 1
