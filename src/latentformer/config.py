"""Typed configuration: dataclasses, validation, presets, dict/JSON/YAML I/O.

One config system serves YAML files, Python and the command line: every config is a
dataclass; `from_dict` checks field names and types; `apply_overrides` takes dotted
`section.field=value` strings (the CLI's `--model.n_layers 6`) and parses the value
with the field's declared type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# The fields each attention kind owns. A field owned by some kinds only stays unset (None) in a
# config of another kind: setting it there is a ValueError naming it, not a silently ignored value.
# The module of each kind is registered in model/attention.py (ATTENTION_MODULES), by the same names.
_KV_HEAD_FIELDS = ("n_kv_heads", "head_dim")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "latent_norm_eps")
ATTENTION_FIELDS = {"mha": _KV_HEAD_FIELDS, "gqa": _KV_HEAD_FIELDS, "mqa": _KV_HEAD_FIELDS, "mla": MLA_FIELDS}
ATTENTION_KINDS = tuple(ATTENTION_FIELDS)
# MLA's sizes when a config leaves them unset (qk_rope_head_dim: 0 when rope is off); before they
# became None-by-default they were every config's defaults, and ModelConfig.to_dict wrote them for
# every kind (see ModelConfig.from_dict for how such files still load)
MLA_DEFAULTS = {"q_lora_rank": 0, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3")


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert `value` (from YAML/JSON or a CLI string) to the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        out = [_coerce(name, args[0] if args else Any, v) for v in value]
        return tuple(out) if origin is tuple else out
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ValueError(f"{name}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a dict; unknown keys and bad types are ValueErrors naming the field."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
    if cls is ModelConfig:
        data = _drop_legacy_mla_fields(data)
    hints = _type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    data = {k: v for k, v in data.items() if k not in getattr(cls, "RETIRED_FIELDS", ())}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config field {prefix}{unknown[0]!r} (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = value if isinstance(value, hint) else from_dict(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", hint, value)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a (nested) config dataclass, JSON/YAML-safe."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def apply_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """Return a copy of `cfg` with dotted keys (`model.n_layers`) replaced; validation runs again."""
    data = to_dict(cfg)
    model_nodes: dict[int, tuple[dict[str, Any], Any, set[str]]] = {}  # ModelConfig sections: (node, old kind, keys set)
    for dotted, value in overrides.items():
        node, node_cls = data, type(cfg)
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown config field {dotted!r}")
            node, node_cls = node[part], _type_hints(node_cls)[part]
        if parts[-1] not in node:
            raise ValueError(f"unknown config field {dotted!r}")
        if node_cls is ModelConfig:
            model_nodes.setdefault(id(node), (node, node["attention"], set()))[2].add(parts[-1])
        node[parts[-1]] = value
    for node, old_kind, keys in model_nodes.values():
        unset_attention_fields(node, old_kind, keys)
    return from_dict(type(cfg), data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text (byte offset {e.start}): a YAML file was expected") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {msg}")


def _foreign_fields(kind: str) -> list[str]:
    """The fields other attention kinds own and `kind` does not use."""
    return [n for k, names in ATTENTION_FIELDS.items() if k != kind for n in names if n not in ATTENTION_FIELDS[kind]]


def _foreign_field_error(name: str, kind: str) -> str:
    owners = "/".join(k for k, names in ATTENTION_FIELDS.items() if name in names)
    return f"is a field of attention {owners}, unused by attention {kind} (remove it, or choose attention: {owners})"


def unset_attention_fields(data: dict[str, Any], old_kind: Any, keep: set[str]) -> None:
    """After `data["attention"]` changed from `old_kind`: unset (None) the fields that `old_kind`
    owns and the new kind does not, except those in `keep` (set together with the new kind).

    `--model.attention mha` on the MLA preset `tiny` (or `cfg.replace(attention="mha")`) so
    builds an MHA model instead of refusing the preset's kv_lora_rank; `--model.attention mha
    --model.kv_lora_rank 64` is still refused, naming kv_lora_rank."""
    new_kind = data.get("attention")
    if old_kind == new_kind or old_kind not in ATTENTION_FIELDS or new_kind not in ATTENTION_FIELDS:
        return
    for name in ATTENTION_FIELDS[old_kind]:
        if name not in ATTENTION_FIELDS[new_kind] and name not in keep:
            data[name] = None


def _drop_legacy_mla_fields(data: dict[str, Any]) -> dict[str, Any]:
    """An mha/gqa/mqa dict in the format written before MLA's fields defaulted to None, minus them.

    That format carries every MLA size as a number whatever the kind (config.json of old
    checkpoints, config.yaml of old runs, the compare family's mha cells with the tiny preset's
    kv_lora_rank 96): the model never used them, so they are dropped, with latent_norm_eps.
    It is recognized by all of MLA_DEFAULTS' fields being set; a dict that sets only some of them
    (a YAML file, an override) is checked as written, so that `kv_lora_rank: 64` on an MHA model
    is refused rather than ignored."""
    if data.get("attention", "mla") == "mla" or any(data.get(name) is None for name in MLA_DEFAULTS):
        return data
    return {k: v for k, v in data.items() if k not in MLA_FIELDS}


def preset_names() -> list[str]:
    root = resources.files("latentformer") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer.

    MLA head dims (DeepSeek-V2 §2.1): `qk_nope_head_dim` (per-head query/key part without
    position), `qk_rope_head_dim` (per-head query rope part; the rope KEY is one vector
    shared by all heads), `v_head_dim` (per-head value), `kv_lora_rank` (the cached latent).
    """

    # size
    vocab_size: int = 4096
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    max_seq_len: int = 256
    # attention
    attention: str = "mla"  # mha | gqa | mqa | mla
    n_kv_heads: int | None = None  # mha: n_heads; mqa: 1; gqa: required
    head_dim: int | None = None  # mha/gqa/mqa; default d_model // n_heads
    # mla only (None: MLA_DEFAULTS for MLA, unset for the other kinds)
    q_lora_rank: int | None = None  # 0 = no query compression
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    qkv_bias: bool = False  # mha/gqa/mqa: a bias on the q/k/v projections (Qwen2), none on o_proj
    # positions
    rope: bool = True
    rope_theta: float = 10000.0
    rope_interleave: bool = False  # DeepSeek checkpoints rotate adjacent pairs (x0,x1),(x2,x3)...
    yarn_factor: float = 1.0  # > 1 enables YaRN (Peng et al. 2023) context extension
    yarn_original_max_seq_len: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    # other rope scalings of imported checkpoints (transformers' rope_type): linear divides every
    # frequency by the factor; llama3 (Llama 3.1+) divides the low frequencies, keeps the high ones
    # and ramps between them; dynamic (NTK) changes nothing within max_seq_len (it rescales only
    # beyond max_position_embeddings, which a model here never reaches), kept so that export writes it back
    rope_scaling: str = "none"  # none | linear | dynamic | llama3
    rope_scaling_factor: float = 1.0
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    llama3_original_max_seq_len: int = 8192
    pos_embedding: str = "none"  # none | learned | sinusoid (learnable scale and shift)
    # norm
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-6
    latent_norm_eps: float | None = None  # mla only: q_a_norm/kv_a_norm; None = norm_eps (DeepSeek: always 1e-6)
    # mla only: false makes kv_a_norm an identity (no per-token rescaling of the cached latent), as
    # in a model converted from MHA/GQA (interop/to_mla.py), whose keys and values never had such a norm
    kv_latent_norm: bool = True
    norm_placement: str = "pre"  # pre | post
    final_norm: bool = True
    # feed-forward
    ffn: str = "swiglu"  # swiglu | gelu
    d_ff: int = 683
    # mixture of experts
    n_routed_experts: int = 0  # 0 = dense
    n_shared_experts: int = 0
    experts_per_token: int = 2
    moe_d_ff: int = 256
    router_scoring: str = "softmax"  # softmax | sigmoid
    router_noise: bool = False  # noisy top-k gating (Shazeer et al. 2017), training only
    n_expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_layers: int = 0
    aux_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0  # auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2)
    capacity_factor: float = 0.0  # 0 = never drop tokens
    # regularization
    dropout: float = 0.0
    token_dropout: float = 0.0
    # embeddings and init
    tie_embeddings: bool = False
    init_std: float = 0.02
    # multi-token prediction (DeepSeek-V3 §2.2): D sequential modules after the last layer, module
    # k predicting token t+k+1; training only (loss weight train.mtp_weight), ignored by inference
    mtp_depth: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "max_seq_len"):
            _check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _check(self.attention in ATTENTION_KINDS, "attention", f"unknown kind {self.attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        for name in _foreign_fields(self.attention):
            _check(getattr(self, name) is None, name, _foreign_field_error(name, self.attention))
        if self.attention == "mla":
            for name, default in MLA_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, 0 if name == "qk_rope_head_dim" and not self.rope else default)
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                _check(getattr(self, name) > 0, name, f"must be positive for MLA, got {getattr(self, name)}")
            _check(self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0 = no query compression)")
            _check(self.qk_rope_head_dim >= 0, "qk_rope_head_dim", "must be >= 0")
            if self.rope:
                _check(self.qk_rope_head_dim > 0, "qk_rope_head_dim", "must be positive when rope is on")
                _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"rope dim must be even, got {self.qk_rope_head_dim}")
            else:
                _check(self.qk_rope_head_dim == 0, "qk_rope_head_dim", "must be 0 when rope is off")
        else:
            if self.head_dim is None:
                _check(self.d_model % self.n_heads == 0, "d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}")
                self.head_dim = self.d_model // self.n_heads
            _check(self.head_dim > 0, "head_dim", "must be positive")
            if self.attention == "mha":
                if self.n_kv_heads is None:
                    self.n_kv_heads = self.n_heads
                _check(self.n_kv_heads == self.n_heads, "n_kv_heads", f"mha needs n_kv_heads == n_heads ({self.n_heads}); use attention: gqa")
            elif self.attention == "mqa":
                if self.n_kv_heads is None:
                    self.n_kv_heads = 1
                _check(self.n_kv_heads == 1, "n_kv_heads", "mqa needs n_kv_heads == 1")
            else:
                _check(self.n_kv_heads is not None, "n_kv_heads", "gqa needs n_kv_heads")
            _check(self.n_kv_heads > 0, "n_kv_heads", "must be positive")
            _check(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
            if self.rope:
                _check(self.head_dim % 2 == 0, "head_dim", f"rope dim must be even, got {self.head_dim}")
        _check(self.rope or self.pos_embedding != "none", "rope", "a model needs positions: keep rope on or set pos_embedding")
        _check(self.rope_theta > 0, "rope_theta", "must be positive")
        _check(self.yarn_factor >= 1.0, "yarn_factor", "must be >= 1 (1 = no YaRN)")
        _check(self.rope_scaling in ROPE_SCALINGS, "rope_scaling", f"must be one of {', '.join(ROPE_SCALINGS)}, got {self.rope_scaling!r}")
        if self.rope_scaling != "none":
            _check(self.yarn_factor == 1.0, "rope_scaling", f"{self.rope_scaling} cannot be combined with YaRN (yarn_factor > 1)")
            _check(self.rope_scaling_factor >= 1.0, "rope_scaling_factor", f"must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_scaling == "llama3":
            _check(0 < self.llama3_low_freq_factor < self.llama3_high_freq_factor, "llama3_high_freq_factor",
                   f"must exceed llama3_low_freq_factor > 0, got {self.llama3_high_freq_factor} and {self.llama3_low_freq_factor}")
            _check(self.llama3_original_max_seq_len > 0, "llama3_original_max_seq_len", "must be positive")
        _check(not self.qkv_bias or self.attention != "mla", "qkv_bias", "applies to mha/gqa/mqa only (MLA has no q/k/v projections)")
        _check(self.pos_embedding in ("none", "learned", "sinusoid"), "pos_embedding", f"must be none, learned or sinusoid, got {self.pos_embedding!r}")
        _check(self.pos_embedding != "sinusoid" or self.d_model % 2 == 0, "d_model", "sinusoid positions need an even d_model")
        _check(self.norm in ("rmsnorm", "layernorm"), "norm", f"must be rmsnorm or layernorm, got {self.norm!r}")
        _check(self.norm_placement in ("pre", "post"), "norm_placement", f"must be pre or post, got {self.norm_placement!r}")
        _check(self.norm_eps > 0, "norm_eps", "must be positive")
        _check(self.latent_norm_eps is None or self.latent_norm_eps > 0, "latent_norm_eps", "must be positive (or null = norm_eps)")
        _check(self.kv_latent_norm or self.attention == "mla", "kv_latent_norm", "false applies to mla only (the other kinds have no latent)")
        _check(self.ffn in ("swiglu", "gelu"), "ffn", f"must be swiglu or gelu, got {self.ffn!r}")
        _check(self.d_ff > 0, "d_ff", "must be positive")
        _check(self.n_routed_experts >= 0, "n_routed_experts", "must be >= 0")
        if self.n_routed_experts > 0:
            _check(self.experts_per_token >= 1, "experts_per_token", "must be >= 1")
            _check(self.experts_per_token <= self.n_routed_experts, "experts_per_token", f"top-k {self.experts_per_token} > n_routed_experts {self.n_routed_experts}")
            _check(self.moe_d_ff > 0, "moe_d_ff", "must be positive")
            _check(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            _check(self.router_scoring in ("softmax", "sigmoid"), "router_scoring", f"must be softmax or sigmoid, got {self.router_scoring!r}")
            _check(self.n_expert_groups >= 1 and self.n_routed_experts % self.n_expert_groups == 0, "n_expert_groups", f"n_routed_experts={self.n_routed_experts} is not divisible by n_expert_groups={self.n_expert_groups}")
            _check(1 <= self.topk_groups <= self.n_expert_groups, "topk_groups", f"must be in [1, n_expert_groups={self.n_expert_groups}]")
            per_group = self.n_routed_experts // self.n_expert_groups
            _check(self.experts_per_token <= self.topk_groups * per_group, "topk_groups", f"top-{self.experts_per_token} cannot be chosen from {self.topk_groups} group(s) of {per_group} experts")
            _check(0 <= self.first_k_dense_layers <= self.n_layers, "first_k_dense_layers", f"must be in [0, n_layers={self.n_layers}]")
            _check(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        for name in ("aux_loss_coef", "router_bias_update_rate", "capacity_factor"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("dropout", "token_dropout"):
            _check(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        _check(self.init_std > 0, "init_std", "must be positive")
        _check(self.mtp_depth >= 0, "mtp_depth", f"must be >= 0, got {self.mtp_depth}")

    # -- derived sizes -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def layer_is_moe(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense_layers

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: MLA nope + rope; MHA-family head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def v_dim(self) -> int:
        """Per-head value width."""
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        if not self.rope:
            return 0
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def latent_eps(self) -> float:
        """eps of MLA's latent norms (q_a_norm, kv_a_norm)."""
        return self.norm_eps if self.latent_norm_eps is None else self.latent_norm_eps

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(q/k dim), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2 App. B)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope and self.yarn_factor > 1 and self.yarn_mscale_all_dim:
            m = 0.1 * self.yarn_mscale_all_dim * math.log(self.yarn_factor) + 1.0
            scale *= m * m
        return scale

    # -- I/O -----------------------------------------------------------------------------
    # Fields that older config.json files may hold and that are no longer model settings; dropped
    # on load. mla_decode: an inference choice (latentformer.infer.decode.Decoder), not the model's.
    RETIRED_FIELDS: typing.ClassVar[tuple[str, ...]] = ("mla_decode",)

    # fields added later, written only when not at their default: a checkpoint that does not use
    # them stays readable by the versions before them (which refuse unknown fields)
    WRITTEN_WHEN_SET: typing.ClassVar[dict[str, Any]] = {"mtp_depth": 0, "kv_latent_norm": True}

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in to_dict(self).items() if self.WRITTEN_WHEN_SET.get(k, object()) != v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config a dict describes; fields of another attention kind that are set are a ValueError.
        Compatibility: an mha/gqa/mqa dict in the old format (every MLA size a number, as every
        `to_dict` wrote them before they defaulted to None) loads without them (`_drop_legacy_mla_fields`)."""
        return from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ModelConfig:
        return cls.from_dict(yaml.safe_load(text) or {})

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A shipped preset (`configs/<name>.yaml`): tiny, mla-125m, mha-125m, ..."""
        names = preset_names()
        if name not in names:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(names)}")
        text = (resources.files("latentformer") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
        return cls.from_yaml(text)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`; a change of `attention` unsets the old kind's own fields that
        `changes` does not set (`unset_attention_fields`)."""
        if "attention" in changes:
            unset = {"attention": changes["attention"]}
            unset_attention_fields(unset, self.attention, set(changes))
            changes = {**unset, **changes}
        return dataclasses.replace(self, **changes)
