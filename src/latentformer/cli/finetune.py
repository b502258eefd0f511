"""`latentformer finetune`: instruction-tune a checkpoint on conversations, every weight or LoRA adapters.

    latentformer finetune runs/tiny-sotu --data chats.jsonl                  # every weight
    latentformer finetune smollm2 --data chats.jsonl --lora-rank 16         # LoRA (peft), merged into the weights
    latentformer finetune runs/smollm2-chats --resume                       # continue an interrupted run

The data is a JSONL file, one conversation a line ({"messages": [...]} or {"prompt", "completion"}),
rendered with the checkpoint's chat template (or the plain transcript of a base model); the loss is
on the assistant tokens only (data/conversations.py). Training is `latentformer train`'s trainer,
with its run directory, checkpoints, exact resume, Ctrl-C save, evaluation on the held-out
conversations, TensorBoard and progress bar, and its config (model from the checkpoint; data and
train sections from --config YAML, then --train.X / --data.X overrides). Fields that neither sets
take the fine-tuning recipe (`recipe`): 2 epochs; lr 2e-4 with LoRA, without it half the peak lr
the checkpoint's run trained with (a model trained here) or 2e-5 (an imported one); 10% warm-up,
cosine to a tenth, no weight decay, 8 conversations a step, a context fitting the longest
conversation, step-exact (no time budget). Every checkpoint is an ordinary model checkpoint
(a LoRA run's hold the merged weights), for generate, chat, serve, eval and convert.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

HELP = "fine-tune a checkpoint on conversations (JSONL chat data): every weight, or LoRA adapters"

EPOCHS = 2
ROWS_PER_STEP = 8  # conversations per micro-batch (and per step, without accumulation)
CONTEXT_MULTIPLE = 64  # the default context: the longest conversation, rounded up to this


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from latentformer.cli.train import add_run_arguments

    parser.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                        help="the checkpoint to start from (a run directory: its best checkpoint); with --resume, "
                             "the fine-tuning run to continue")
    parser.add_argument("--data", default=None, metavar="FILE.jsonl",
                        help='conversations, one a line: {"messages": [{"role": ..., "content": ...}, ...]} '
                             'or {"prompt": ..., "completion": ...}')
    parser.add_argument("--out", default=None, help="run directory (default: runs/<checkpoint name>-<data file name>)")
    parser.add_argument("--config", default=None, help="YAML run config with sections data/train (the model is the checkpoint's)")
    parser.add_argument("--lora-rank", type=int, default=None, metavar="R",
                        help="train rank-R LoRA adapters (peft) instead of every weight (train.lora_rank; default 0: every weight)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha / R (train.lora_alpha, default 16)")
    parser.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (train.lora_dropout, default 0)")
    parser.add_argument("--lora-targets", default=None, metavar="NAMES",
                        help="comma-separated projections to adapt, e.g. q_a_proj,q_b_proj,kv_a_proj,kv_b_proj,o_proj "
                             "(train.lora_targets; default: every attention and FFN projection)")
    add_run_arguments(parser, "the run RUN_OR_CHECKPOINT", "answer a held-out conversation at the end",
                      "Any data or train field can be overridden: --train.lr 1e-4 --train.max_steps 100 --data.chat_val_fraction 0.05")


def recipe(data, cfg, max_seq_len: int, world_size: int, given: set[str], pretrained_lr: float | None) -> dict[str, object]:
    """The fine-tuning defaults (module doc) of the fields not in `given` (dotted names the YAML file or
    the command line set, whose values `cfg` holds), from the conversations `data` (a ChatData) and
    `pretrained_lr`, the peak lr of the checkpoint's run (None for an imported model)."""
    t = cfg.train

    def value(key: str, default):
        return getattr(t, key.split(".")[1]) if key in given else default

    seq_len = value("train.seq_len", min(max_seq_len, -(-data.longest // CONTEXT_MULTIPLE) * CONTEXT_MULTIPLE))
    micro = value("train.micro_batch_size", ROWS_PER_STEP)
    batch_tokens = value("train.batch_tokens", micro * seq_len * world_size)
    steps = value("train.max_steps", math.ceil(EPOCHS * len(data.splits["train"]) / max(1, batch_tokens // seq_len)))
    lr = value("train.lr", 2e-4 if t.lora_rank else pretrained_lr / 2 if pretrained_lr else 2e-5)
    defaults = {"train.seq_len": seq_len, "train.micro_batch_size": micro, "train.batch_tokens": batch_tokens,
                "train.max_steps": steps, "train.warmup_steps": max(1, steps // 10), "train.eval_interval": max(1, steps // 4),
                "train.lr": lr, "train.min_lr": lr / 10, "train.weight_decay": 0.0, "train.max_time_minutes": 0}
    return {k: v for k, v in defaults.items() if k not in given}


def _resolve(args: argparse.Namespace):
    """(config, run dir, replace, init checkpoint or None on --resume)."""
    from latentformer.checkpoint import find_checkpoint, read_config
    from latentformer.cli.train import is_run_dir
    from latentformer.config import load_yaml
    from latentformer.data.conversations import ChatData
    from latentformer.data.tokenizer import load_tokenizer
    from latentformer.fsutil import check_output
    from latentformer.train.config import RunConfig, build_run_config, load_run_config, parse_overrides, run_config_of
    from latentformer.train.lora import require_peft

    overrides = parse_overrides(list(getattr(args, "overrides", None) or []))
    for flag, key in (("lora_rank", "train.lora_rank"), ("lora_alpha", "train.lora_alpha"),
                      ("lora_dropout", "train.lora_dropout"), ("lora_targets", "train.lora_targets")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    model_keys = sorted(k for k in overrides if k.startswith("model."))
    if model_keys:
        raise ValueError(f"finetune takes the model config from the checkpoint: drop --{model_keys[0]}")
    if args.resume:
        if args.out or args.data or args.config:
            raise ValueError("--resume continues the run RUN_OR_CHECKPOINT with its saved config.yaml: give only overrides with it")
        out = Path(args.path)
        if not (out / "config.yaml").is_file():
            raise ValueError(f"--resume: {out} is not a run directory (no config.yaml)")
        cfg = load_run_config(out / "config.yaml", overrides)
        if cfg.train.lora_rank:
            require_peft()
        return cfg, out, False, None
    if args.data is None:
        raise ValueError("give the conversations to fine-tune on: --data FILE.jsonl (or continue a run: RUN --resume)")
    yaml = load_yaml(args.config) if args.config else {}
    if yaml.get("model") or yaml.get("preset"):
        raise ValueError(f"config file {args.config}: finetune takes the model from the checkpoint: drop its model/preset section")
    init = find_checkpoint(args.path)
    model_cfg = read_config(init)
    overrides.update({"data.chat_file": args.data, "data.tokenizer": str(init.resolve())})
    cfg, _ = build_run_config(yaml_path=args.config, overrides=overrides)  # the checks of every field given
    given = set(overrides) | {f"{section}.{key}" for section in ("data", "train") for key in (yaml.get(section) or {})}
    if cfg.train.lora_rank:
        require_peft()
    seq_len = cfg.train.seq_len if "train.seq_len" in given else model_cfg.max_seq_len
    data = ChatData(args.data, load_tokenizer(init), seq_len, cfg.data.chat_val_fraction)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    source = run_config_of(init)
    defaults = recipe(data, cfg, model_cfg.max_seq_len, world, given, source.train.lr if source else None)
    cfg, _ = build_run_config(yaml_path=args.config, overrides={**defaults, **overrides})
    cfg = RunConfig(model_cfg, cfg.data, cfg.train)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.path).resolve().name}-{Path(args.data).stem}"
    inputs = [Path(args.data), init] + ([Path(args.config)] if args.config else [])
    replace = check_output(out, "run", True, inputs=inputs, recognise=is_run_dir)
    if replace and not args.force:
        raise ValueError(f"run directory {out} exists; use --resume to continue it, --force to start over, or --out")
    return cfg, out, replace, init


def _sample(out: Path, cfg) -> None:
    """Greedy reply to the first held-out conversation's last prompt, beside the reference answer."""
    from latentformer.checkpoint import load
    from latentformer.data.conversations import ChatData
    from latentformer.infer.chat import chat_stops, render_chat
    from latentformer.infer.generate import generate

    model, tokenizer = load(out, device="cpu")
    messages = ChatData(cfg.data.chat_file, tokenizer, cfg.train.seq_len, cfg.data.chat_val_fraction).messages["val"][0]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    reply = generate(model, tokenizer, render_chat(tokenizer, messages[:last]), max_new_tokens=cfg.train.sample_tokens,
                     temperature=0, stop=chat_stops(tokenizer) or None, truncate=True)
    print(f"\nsample (a held-out conversation, greedy):\n  {messages[last - 1]['role']}: {messages[last - 1]['content']}"
          f"\n  model: {reply.strip()}\n  reference: {messages[last]['content']}\n")


def run(args: argparse.Namespace) -> int:
    from latentformer.cli.train import fit

    cfg, out, replace, init = _resolve(args)
    return fit("finetune", cfg, out, f"latentformer finetune {out} --resume", explicit=True, replace=replace, init=init,
               resume=args.resume,
               sample=None if args.no_sample else _sample)
