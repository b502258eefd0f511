"""`latentformer eval PATH [--data DATA]`: loss, perplexity and bits per byte over a whole split.

DATA is a prepared directory, or a source (`sotu`, a directory of .txt files, ...) prepared with
the checkpoint's tokenizer into the data cache as `train` does. Without --data, the data recorded
in the run's config.yaml is used (its `data.dir`, else its source in the cache; for a `finetune` run,
its conversations: the loss of the assistant tokens of the held-out ones, or of the training ones).

`--tasks T1,T2` scores the checkpoint on lm-evaluation-harness tasks instead (`lm_eval.simple_evaluate`
with `latentformer.interop.lm_eval.LatentformerLM`): task names (`hellaswag,arc_easy`, their datasets
from the Hugging Face hub) or paths to task YAML files (a local task). Needs `pip install lm-eval`.
"""

from __future__ import annotations

import argparse
import json

HELP = "evaluate a checkpoint or run directory on a prepared data split (loss, perplexity, bits per byte)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory, or a run directory (its best, else latest, checkpoint)")
    parser.add_argument("--data", default=None,
                        help="prepared data directory, or a source (sotu, DIR of .txt, ...) prepared into the cache "
                             "with the checkpoint's tokenizer (default: the data of the run's config.yaml)")
    parser.add_argument("--split", default="val", choices=("val", "train"), help="split to evaluate (default: val)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: 8)")
    parser.add_argument("--seq-len", type=int, default=0, help="window length (default: the training context, else the model's max_seq_len)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="autocast dtype (default: fp32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    harness = parser.add_argument_group("lm-evaluation-harness tasks (pip install lm-eval)")
    harness.add_argument("--tasks", default=None,
                         help="comma-separated harness task names (hellaswag,arc_easy) or task YAML files: score "
                              "the checkpoint on them instead of perplexity (--batch-size rows per forward, "
                              "--seq-len the scoring context)")
    harness.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    harness.add_argument("--limit", type=float, default=None,
                         help="documents per task: a count, or a fraction of the task when < 1 (default: all)")


def _cached(source: str, tokenizer, run_cfg):
    """Prepare `source` with the checkpoint's `tokenizer` into the data cache, where `train` puts it."""
    import sys

    from latentformer.data.prepare import prepare
    from latentformer.data.sources import open_source
    from latentformer.train.config import DataConfig

    cache_dir = run_cfg.data.cache_dir if run_cfg is not None else None
    if run_cfg is not None and not run_cfg.data.dir and run_cfg.data.source == source:
        spec = label = run_cfg.data.tokenizer  # the very entry train prepared (a trained BPE is not retrained)
    elif tokenizer.kind in ("gpt2", "byte"):
        spec = label = tokenizer.kind
    else:
        spec, label = tokenizer, f"{tokenizer.kind}-{tokenizer.describe()['sha256'][:12]}"
    target = DataConfig(source=source, tokenizer=label, cache_dir=cache_dir).resolved_dir()
    src = open_source(source)  # a bad source is reported before anything is printed
    print(f"data: {source} with tokenizer {label} -> {target}", file=sys.stderr)
    prepare(src, spec, target, progress=sys.stderr.isatty(), replace_stale=True)
    return target


def resolve_data(data: str | None, ckpt, tokenizer):
    """The prepared directory to evaluate on (see the module docstring)."""
    from pathlib import Path

    from latentformer.train.config import run_config_of

    run_cfg = run_config_of(ckpt)
    if data is None:
        if run_cfg is None:
            raise ValueError(f"{ckpt} is not part of a run directory (no config.yaml): give --data DIR or a source")
        if run_cfg.data.dir:
            if not Path(run_cfg.data.dir).expanduser().is_dir():
                raise ValueError(f"the run's data directory {run_cfg.data.dir} (its config.yaml's data.dir) does not exist "
                                 "from here: give --data")
            return Path(run_cfg.data.dir).expanduser()
        return _cached(run_cfg.data.source, tokenizer, run_cfg)
    if (Path(data) / "meta.json").is_file():
        return Path(data)
    return _cached(data, tokenizer, run_cfg)


def run(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from latentformer.checkpoint import CONFIG, find_checkpoint, load
    from latentformer.cli.generate import check_device
    from latentformer.data.dataset import TokenData
    from latentformer.data.tokenizer import check_vocab_fits
    from latentformer.train.distributed import best_device
    from latentformer.train.config import run_config_of
    from latentformer.train.evaluate import evaluate_batches

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tasks is not None:
        return run_tasks(args)
    device = best_device() if args.device == "auto" else check_device(args.device)
    ckpt = find_checkpoint(args.path)
    model, tokenizer = load(ckpt, device=device)
    # default context: what the run trained at (config.json `train_seq_len`), else max_seq_len
    seq_len = args.seq_len or json.loads((ckpt / CONFIG).read_text()).get("train_seq_len") or model.config.max_seq_len
    if not 0 < seq_len <= model.config.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, {model.config.max_seq_len}], got {seq_len}")
    run_cfg = run_config_of(ckpt)
    if args.data is None and run_cfg is not None and run_cfg.data.chat_file:  # a finetune run: its conversations
        from latentformer.data.conversations import ChatData

        data_dir = run_cfg.data.chat_file
        data = ChatData(data_dir, tokenizer, seq_len, run_cfg.data.chat_val_fraction)
    else:
        data_dir = resolve_data(args.data, ckpt, tokenizer)
        data = TokenData(data_dir)
        check_vocab_fits(data.meta, model.config.vocab_size)
        same = ("kind", "vocab_size", "sha256")
        if [tokenizer.describe().get(k) for k in same] != [data.tokenizer.describe().get(k) for k in same]:
            raise ValueError(f"{ckpt} was trained with another tokenizer than {data_dir} ({tokenizer.kind} vs {data.tokenizer.kind}); "
                             "prepare the data with the checkpoint's tokenizer directory")
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    result = evaluate_batches(model, data.eval_batches(args.split, args.batch_size, seq_len),
                              bytes_per_token=data.bytes_per_token(args.split), device=device, autocast=autocast)
    result = {"checkpoint": str(ckpt), "data": str(data_dir), "split": args.split, "seq_len": seq_len, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{ckpt} on {data_dir} [{args.split}]: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"bits/byte {result['bpb']:.4f}  ({result['tokens']:,} tokens, context {seq_len})")
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """`eval PATH --tasks ...`: the lm-evaluation-harness on the checkpoint."""
    import importlib.util
    import os

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--tasks needs lm-evaluation-harness: pip install lm-eval (or pip install 'latentformer[eval]')")
    if args.data is not None:
        raise ValueError("--data is for perplexity; with --tasks the harness reads each task's own data")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty: give task names (hellaswag,arc_easy) or task YAML files")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    limit = args.limit
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be > 0, got {limit:g}")
        limit = int(limit) if limit >= 1 else limit
        if limit != args.limit and args.limit >= 1:
            raise ValueError(f"--limit must be a whole count or a fraction below 1, got {args.limit:g}")

    import lm_eval
    from lm_eval.tasks import TaskManager

    from latentformer.cli.generate import check_device
    from latentformer.interop.lm_eval import LatentformerLM
    from latentformer.train.distributed import best_device

    device = best_device() if args.device == "auto" else check_device(args.device)
    lm = LatentformerLM(path=args.path, batch_size=args.batch_size, max_length=args.seq_len or None, device=device,
                        dtype=args.dtype)
    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                  for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                      batch_size=args.batch_size, task_manager=TaskManager(), log_samples=False)
    except KeyError as e:
        if "not a registered task" not in str(e):
            raise
        raise ValueError(f"--tasks: {e.args[0] if e.args else e} (see `lm_eval ls tasks`)") from None
    except ConnectionError as e:  # datasets: "Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)"
        why = ("HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set: unset it to download the task's data, or use a local task YAML"
               if offline else "the Hugging Face hub could not be reached")
        raise ValueError(f"--tasks: a task needs its dataset from the network ({str(e).splitlines()[0]}); {why}") from None
    result = {"checkpoint": str(lm_checkpoint(args.path)), "tasks": tasks, "max_length": lm.max_length,
              "results": out["results"], **({"groups": out["groups"]} if out.get("groups") else {})}
    if args.json:
        print(json.dumps(result, default=_jsonable))
    else:
        from lm_eval.utils import make_table

        print(f"{result['checkpoint']}: {', '.join(tasks)} (context {lm.max_length}, batch {args.batch_size}"
              f"{f', {args.num_fewshot}-shot' if args.num_fewshot is not None else ''}"
              f"{f', limit {limit}' if limit is not None else ''})")
        print(make_table(out))
        if out.get("groups"):
            print(make_table(out, "groups"))
    return 0


def lm_checkpoint(path):
    from latentformer.checkpoint import find_checkpoint

    return find_checkpoint(path)


def _jsonable(value):
    """numpy scalars (the harness's metric values) as Python numbers; anything else as its str."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)
