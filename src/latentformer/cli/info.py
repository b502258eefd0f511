"""`latentformer info`: what a checkpoint holds (size, attention, cache cost, context, tokenizer),
or with `--presets` a table of the shipped model presets."""

from __future__ import annotations

import argparse
import json

from latentformer.cli.generate import add_model_arguments, load_from_args

HELP = "describe a checkpoint: parameters, attention, KV-cache bytes per token, context, tokenizer, FLOPs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, path_optional=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--presets", action="store_true", help="list the shipped model presets instead (no PATH)")


def describe(model, tokenizer) -> dict:
    """JSON-safe summary of a loaded (model, tokenizer)."""
    import torch

    from latentformer.config import ATTENTION_FIELDS
    from latentformer.model.attention import attention_module

    cfg = model.config
    dtype = next(model.parameters()).dtype
    attention = {"kind": cfg.attention, "n_heads": cfg.n_heads, "summary": attention_module(cfg).describe(cfg),
                 **{name: getattr(cfg, name) for name in ATTENTION_FIELDS[cfg.attention]}}
    train_flops = model.flops_per_token()
    return {
        "parameters": model.num_params(),
        "active_parameters": model.num_params(active=True),
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "attention": attention,
        "moe": {"routed_experts": cfg.n_routed_experts, "shared_experts": cfg.n_shared_experts,
                "experts_per_token": cfg.experts_per_token} if cfg.is_moe else None,
        "positions": {"rope": cfg.rope, "yarn_factor": cfg.yarn_factor, "pos_embedding": cfg.pos_embedding},
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_bytes_per_token": model.kv_cache_bytes_per_token(dtype),
        "kv_cache_bytes_per_token_bf16": model.kv_cache_bytes_per_token(torch.bfloat16),
        "max_seq_len": cfg.max_seq_len,
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id},
        "model_vocab_size": cfg.vocab_size,
        # Transformer.flops_per_token: 6 N + attention at max_seq_len (training); a forward is a third
        "flops_per_token_train": train_flops,
        "flops_per_token_forward": train_flops / 3,
    }


def preset_table() -> list[dict]:
    """Size and cache cost of every shipped preset (built on the meta device: no memory)."""
    import torch

    from latentformer import ModelConfig, Transformer
    from latentformer.config import preset_names

    rows = []
    for name in preset_names():
        cfg = ModelConfig.preset(name)
        with torch.device("meta"):
            model = Transformer(cfg)
        rows.append({"preset": name, "attention": cfg.attention, "layers": cfg.n_layers, "d_model": cfg.d_model,
                     "parameters": model.num_params(), "active_parameters": model.num_params(active=True),
                     "kv_cache_bytes_per_token_bf16": model.kv_cache_bytes_per_token(torch.bfloat16),
                     "max_seq_len": cfg.max_seq_len, "vocab_size": cfg.vocab_size})
    return rows


def run(args: argparse.Namespace) -> int:
    if args.presets:
        rows = preset_table()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'preset':18} {'attn':4} {'layers':>6} {'d_model':>7} {'params':>9} {'active':>9} {'KV B/tok':>9} {'context':>8}")
        for r in rows:
            print(f"{r['preset']:18} {r['attention']:4} {r['layers']:>6} {r['d_model']:>7} {r['parameters'] / 1e6:8.1f}M "
                  f"{r['active_parameters'] / 1e6:8.1f}M {r['kv_cache_bytes_per_token_bf16']:>9,} {r['max_seq_len']:>8,}")
        return 0
    if args.path is None:
        raise ValueError("give a checkpoint or run directory, or --presets")
    model, tokenizer = load_from_args(args, check_finite=False)  # describing a diverged checkpoint is fine
    info = describe(model, tokenizer)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    a = info["attention"]
    detail = ", ".join(f"{k}={v}" for k, v in a.items() if k not in ("kind", "summary"))
    lines = [
        f"checkpoint      {args.path}",
        f"parameters      {info['parameters']:,} ({info['active_parameters']:,} active per token)",
        f"layers          {info['layers']} x d_model {info['d_model']}",
        f"attention       {a['kind']} ({detail})",
    ]
    if info["moe"]:
        m = info["moe"]
        lines.append(f"moe             {m['routed_experts']} routed + {m['shared_experts']} shared experts, top-{m['experts_per_token']}")
    lines += [
        f"kv cache        {info['kv_cache_bytes_per_token']:,} bytes/token ({info['dtype']}), "
        f"{info['kv_cache_bytes_per_token_bf16']:,} bytes/token (bfloat16)",
        f"max context     {info['max_seq_len']:,} tokens",
        f"tokenizer       {info['tokenizer']['kind']} (vocab {info['tokenizer']['vocab_size']:,}; model vocab {info['model_vocab_size']:,})",
        f"flops/token     {info['flops_per_token_forward']:.3g} forward, {info['flops_per_token_train']:.3g} training (at max context)",
    ]
    print("\n".join(lines))
    return 0
