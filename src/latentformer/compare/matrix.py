"""The comparison matrix: a family of attention variants at matched parameters, times seeds.

A *family* names its members (`mha`, `gqa`, `mqa`, `mla`: a preset plus model overrides), the
member whose parameter count the others match (`reference`), and the default recipe (variants,
seeds, tokens per cell, train overrides, data, decode points). A *variant* is a member or a preset
name, optionally followed by `:field=value` overrides of model fields (`field` or `model.field`)
and of training fields (`train.field`): `mla:kv_lora_rank=64`, `mha:n_layers=6:d_ff=512`,
`mla:train.optimizer=muon`. A *cell* is one variant trained with one seed: an ordinary run
directory built by `build_run_config`, exactly as `latentformer train --preset P --model.X ...`,
named after the variant (so cells of different training settings are different cells).

Parameter matching: every variant must have within `tolerance` (2%) of the reference's
parameters. A dense variant that misses and does not set `d_ff` itself gets the FFN width that
matches best (a multiple of `d_ff_multiple`, as the 125m presets were matched); what is still
outside the tolerance is refused, or only warned about when the caller allows it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentformer.config import ModelConfig, apply_overrides, from_dict, load_yaml, to_dict
from latentformer.model.transformer import Transformer
from latentformer.train.config import RunConfig, build_run_config

TOLERANCE = 0.02
# train fields that make the cells of a comparison comparable (the same tokens, evaluated at the
# same points on the same windows, from the matrix's seeds): no variant sets them
SHARED_TRAIN = frozenset({"max_steps", "batch_tokens", "seq_len", "eval_interval", "eval_tokens", "seed",
                          "max_time_minutes", "early_stopping_patience"})


@dataclass
class Member:
    """A named family member: a shipped preset plus model-field overrides."""

    preset: str
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class Family:
    name: str
    description: str
    reference: str  # member whose parameter count the others match
    members: dict[str, Member]
    variants: list[str]  # default variants
    seeds: int
    tokens: int  # training tokens per cell
    train: dict[str, Any] = field(default_factory=dict)  # train-field overrides of every cell
    source: str = "sotu"  # default corpus (prepared like `latentformer train --source`)
    tokenizer: str = "bpe:4096"
    decode_contexts: list[int] = field(default_factory=lambda: [128, 512, 2048])
    decode_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    evals: int = 8  # validation points per cell (the loss curve)
    d_ff_multiple: int = 16

    def __post_init__(self) -> None:
        if self.reference not in self.members:
            raise ValueError(f"family {self.name}: reference {self.reference!r} is not one of its members")
        if self.seeds < 1 or self.tokens < 1 or self.evals < 1 or self.d_ff_multiple < 1:
            raise ValueError(f"family {self.name}: seeds, tokens, evals and d_ff_multiple must be positive")
        if not self.decode_contexts or not self.decode_batch_sizes or min(self.decode_contexts + self.decode_batch_sizes) < 1:
            raise ValueError(f"family {self.name}: decode_contexts and decode_batch_sizes must be positive lists")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self) | {"members": {k: to_dict(m) for k, m in self.members.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Family:
        data = dict(data)
        members = data.pop("members", None)
        if not isinstance(members, dict) or not members:
            raise ValueError("family: `members` must be a non-empty mapping of name -> {preset, model}")
        parsed = {str(name): from_dict(Member, m or {}, f"members.{name}.") for name, m in members.items()}
        return from_dict(cls, {**data, "members": parsed})


# The tiny baselines drop MLA's latent projections and get a wider or narrower FFN instead: the
# d_ff values are what `match_d_ff` computes (multiples of 16), all within 0.5% of tiny MLA
# (tests/compare/test_matrix.py checks the tolerance).
TINY = Family(
    name="tiny", description="the tiny MLA preset (4M parameters) and MHA/GQA/MQA baselines matched to it, on a CPU",
    reference="mla",
    members={"mla": Member("tiny"),
             "mha": Member("tiny", {"attention": "mha", "d_ff": 624}),
             "gqa": Member("tiny", {"attention": "gqa", "n_kv_heads": 2, "d_ff": 720}),
             "mqa": Member("tiny", {"attention": "mqa", "d_ff": 752})},
    variants=["mha", "gqa", "mqa", "mla"], seeds=2, tokens=262_144,  # 128 steps of 2,048 tokens
    train={"eval_tokens": 8192},
    decode_contexts=[128, 512, 2048], decode_batch_sizes=[1, 8], evals=8, d_ff_multiple=16)

M125 = Family(
    name="125m", description="the GPT-2-small-class presets mla-125m / mha-125m / gqa-125m / mqa-125m, on a GPU",
    reference="mla",
    members={"mla": Member("mla-125m"), "mha": Member("mha-125m"), "gqa": Member("gqa-125m"), "mqa": Member("mqa-125m")},
    variants=["mha", "gqa", "mqa", "mla", "mla:kv_lora_rank=64", "mla:kv_lora_rank=256"], seeds=2, tokens=50_000_000,
    train={"seq_len": 1024, "micro_batch_size": 32, "batch_tokens": 131072, "lr": 1e-3, "min_lr": 1e-4,
           "warmup_steps": 40, "eval_batch_size": 32},
    source="sotu", tokenizer="gpt2",
    decode_contexts=[1024, 4096, 16384], decode_batch_sizes=[1, 16, 64], evals=16, d_ff_multiple=64)

FAMILIES = {f.name: f for f in (TINY, M125)}


def load_family(name_or_path: str) -> Family:
    """A shipped family by name, or one defined in a YAML file (the fields of `Family`)."""
    if name_or_path in FAMILIES:
        return FAMILIES[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"--family {name_or_path!r}: unknown family; choose {', '.join(FAMILIES)} or a YAML file")
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    return Family.from_dict(data)


@dataclass
class Variant:
    """One resolved variant: its name as given, its full run config and its size."""

    name: str
    preset: str
    model_overrides: dict[str, Any]  # member + variant + matched d_ff, as model-field overrides
    train_overrides: dict[str, Any]  # the variant's own train-field overrides (over the common ones)
    cfg: RunConfig
    params: int
    deviation: float  # params / reference params - 1
    matched_d_ff: int | None = None  # the d_ff that matching chose (None: unchanged)

    @property
    def slug(self) -> str:
        """A file-name-safe form of the name (cell directories)."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.name)


def parse_variant(text: str, family: Family) -> tuple[str, dict[str, Any], set[str], dict[str, Any]]:
    """`member-or-preset[:field=value...]` -> (preset, model overrides with the member's first,
    the model fields the variant text itself sets, train overrides). `field` and `model.field`
    name model fields, `train.field` training fields."""
    from latentformer.config import preset_names

    base, *pairs = text.strip().split(":")
    if base in family.members:
        member = family.members[base]
        preset, overrides = member.preset, dict(member.model)
    elif base in preset_names():
        preset, overrides = base, {}
    else:
        raise ValueError(f"variant {text!r}: {base!r} is neither a member of the {family.name} family "
                         f"({', '.join(family.members)}) nor a preset ({', '.join(preset_names())})")
    own, train = set(), {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key or not value:
            raise ValueError(f"variant {text!r}: expected field=value after ':', got {pair!r}")
        section, _, name = key.rpartition(".")
        if section == "train":
            if name in SHARED_TRAIN:
                raise ValueError(f"variant {text!r}: train.{name} is shared by every cell of a comparison; "
                                 f"set it for all with --train.{name}")
            train[name] = value
        elif section in ("", "model"):
            overrides[name] = value
            own.add(name)
        else:
            raise ValueError(f"variant {text!r}: {key!r} is not a model field (field or model.field) "
                             "nor a training field (train.field)")
    return preset, overrides, own, train


def count_params(model: ModelConfig) -> int:
    """Parameters of `model` as served, counted on the meta device (no memory, no init cost): the
    training-only MTP modules are left out, so `mla:model.mtp_depth=1` is matched (and compared) at
    the size of the model it trains; its training FLOPs count them (`flops_per_token`)."""
    with torch.device("meta"):
        return Transformer(model.replace(mtp_depth=0)).num_params()


def _build(preset: str, model_overrides: dict[str, Any], common: dict[str, Any],
           train_overrides: dict[str, Any] | None = None) -> RunConfig:
    overrides = {**common, **{f"model.{k}": v for k, v in model_overrides.items()},
                 **{f"train.{k}": v for k, v in (train_overrides or {}).items()}}
    cfg, _ = build_run_config(preset=preset, overrides=overrides)
    cfg.check()
    return cfg


def match_d_ff(cfg: ModelConfig, target: int, multiple: int) -> int:
    """The d_ff (a positive multiple of `multiple`) whose parameter count is nearest `target`.
    Parameters are affine in d_ff for a dense model, so two counts give the slope."""
    base = count_params(cfg)
    slope = (count_params(cfg.replace(d_ff=cfg.d_ff + multiple)) - base) / multiple
    ideal = cfg.d_ff + (target - base) / slope
    return max(multiple, multiple * round(ideal / multiple))


VOCAB_MULTIPLE = 64


def resolve_variants(family: Family, names: list[str], common: dict[str, Any], vocab_size: int, *,
                     match: bool = True, tolerance: float = TOLERANCE) -> tuple[list[Variant], int]:
    """Each variant's run config (common: dotted overrides of every cell, e.g. data.dir, train.*),
    with the data's vocabulary (padded to a multiple of VOCAB_MULTIPLE: the output layer's matmul is
    faster on a GPU, the extra ids never occur and learn to be improbable) unless a variant sets its
    own, and matched parameters. Returns (variants, reference params); parameter deviations are checked by `check_matching`."""
    if len(set(names)) != len(names):
        raise ValueError(f"--variants: {sorted(n for n in names if names.count(n) > 1)[0]!r} is given twice")

    padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def with_vocab(overrides: dict[str, Any]) -> dict[str, Any]:
        return {"vocab_size": padded, **overrides}

    ref_preset, ref_overrides, _, _ = parse_variant(family.reference, family)
    ref_params = count_params(_build(ref_preset, with_vocab(ref_overrides), common).model)
    out = []
    for name in names:
        preset, overrides, own, train = parse_variant(name, family)
        overrides = with_vocab(overrides)
        try:
            cfg = _build(preset, overrides, common, train)
        except ValueError as e:
            raise ValueError(f"variant {name!r}: {e}") from None
        params, matched = count_params(cfg.model), None
        fixed_d_ff = "d_ff" in own or "model.d_ff" in common  # the user chose the width: keep it
        if match and abs(params / ref_params - 1) > tolerance and not cfg.model.is_moe and not fixed_d_ff:
            matched = match_d_ff(cfg.model, ref_params, family.d_ff_multiple)
            overrides = {**overrides, "d_ff": matched}
            cfg = _build(preset, overrides, common, train)
            params = count_params(cfg.model)
        out.append(Variant(name, preset, overrides, train, cfg, params, params / ref_params - 1, matched))
    if len({v.slug for v in out}) != len(out):
        raise ValueError("--variants: two variants have the same directory name; rename one")
    return out, ref_params


def check_matching(variants: list[Variant], tolerance: float = TOLERANCE) -> list[str]:
    """Names (with deviations) of the variants outside the tolerance, e.g. ['mha (+3.1%)']."""
    return [f"{v.name} ({100 * v.deviation:+.1f}%)" for v in variants if abs(v.deviation) > tolerance + 1e-12]


@dataclass
class Cell:
    variant: Variant
    seed_index: int
    cfg: RunConfig  # the variant's config with this cell's seed

    @property
    def name(self) -> str:
        return f"{self.variant.slug}-s{self.seed_index}"


def cells(variants: list[Variant], seeds: int) -> list[Cell]:
    """Seed-major order (every variant's first seed first): a cut-off matrix still compares all variants."""
    out = []
    for s in range(seeds):
        for v in variants:
            cfg = apply_overrides(v.cfg, {"train.seed": v.cfg.train.seed + s})
            out.append(Cell(v, s, cfg))
    return out


def steps_for_tokens(tokens: int, batch_tokens: int) -> int:
    return max(1, math.ceil(tokens / batch_tokens))
