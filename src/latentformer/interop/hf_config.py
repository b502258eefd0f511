"""ModelConfig <-> Hugging Face config.json, both ways.

Targets (the transformers classes whose math we match):
  MLA, dense or sigmoid-scored MoE  -> DeepseekV3ForCausalLM
  MLA with softmax-scored MoE        -> DeepseekV2ForCausalLM
  MHA / GQA / MQA, dense             -> LlamaForCausalLM (Qwen2ForCausalLM with a q/k/v bias)
Read as well: MistralForCausalLM (Llama's math when no sliding window applies within the context)
and model_type kimi_k2 (DeepseekV3 under another name: transformers maps it to deepseek_v3).
A feature the target cannot express is a ValueError naming it: a conversion never yields a
silently different model. A config.json that is not an object, lacks a field or has a field of the
wrong type is a ValueError naming the field. transformers itself is not needed here (plain JSON).
"""

from __future__ import annotations

import math
from typing import Any

from latentformer.config import ModelConfig

LLAMA, MISTRAL, QWEN2, DEEPSEEK_V2, DEEPSEEK_V3, KIMI_K2 = "llama", "mistral", "qwen2", "deepseek_v2", "deepseek_v3", "kimi_k2"
ARCHITECTURES = {LLAMA: "LlamaForCausalLM", QWEN2: "Qwen2ForCausalLM",
                 DEEPSEEK_V2: "DeepseekV2ForCausalLM", DEEPSEEK_V3: "DeepseekV3ForCausalLM"}
# model_types imported as the family whose math they share
FAMILY = {LLAMA: LLAMA, MISTRAL: LLAMA, QWEN2: LLAMA, DEEPSEEK_V2: DEEPSEEK_V2, DEEPSEEK_V3: DEEPSEEK_V3, KIMI_K2: DEEPSEEK_V3}
# transformers' DeepSeek attention builds q_a_layernorm/kv_a_layernorm with the default eps,
# whatever rms_norm_eps says (rms_norm_eps is for the other norms): ours is latent_norm_eps.
DEEPSEEK_LATENT_NORM_EPS = 1e-6
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# transformers' class defaults of max_position_embeddings, for a config.json without it: YaRN's and
# llama3's original context (and YaRN's factor) default to it
MAX_POSITIONS = {LLAMA: 2048, MISTRAL: 131072, QWEN2: 32768, DEEPSEEK_V2: 2048, DEEPSEEK_V3: 4096, KIMI_K2: 4096}


def _unsupported(feature: str, target: str, why: str = "") -> ValueError:
    return ValueError(f"cannot convert: {feature} is not expressible in {target}{' (' + why + ')' if why else ''}")


# -- ours -> HF ------------------------------------------------------------------------------

def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type a model exports to (ValueError if there is none)."""
    if cfg.attention == "mla":
        if cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers and cfg.router_scoring == "softmax":
            return DEEPSEEK_V2
        return DEEPSEEK_V3
    target = QWEN2 if cfg.qkv_bias else LLAMA
    if cfg.attention not in ("mha", "gqa", "mqa"):  # Llama's attention: n_kv_heads key/value heads
        raise _unsupported(f"attention={cfg.attention}", ARCHITECTURES[target])
    if cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers:
        raise _unsupported(f"a Mixture-of-Experts FFN with attention={cfg.attention}", ARCHITECTURES[target],
                           "MoE exports only with attention=mla, as DeepSeek")
    return target


def _check_common(cfg: ModelConfig, target: str) -> None:
    checks = [
        (cfg.pos_embedding != "none", f"pos_embedding={cfg.pos_embedding} (additive positions)"),
        (not cfg.rope, "rope=false (no rotary positions)"),
        (cfg.norm != "rmsnorm", f"norm={cfg.norm}"),
        (cfg.norm_placement != "pre", f"norm_placement={cfg.norm_placement}"),
        (not cfg.final_norm, "final_norm=false"),
        (cfg.ffn != "swiglu", f"ffn={cfg.ffn}"),
    ]
    if cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers:
        checks += [
            (cfg.router_noise, "router_noise=true (noisy top-k gating)"),
            (cfg.capacity_factor > 0, f"capacity_factor={cfg.capacity_factor} (token dropping)"),
        ]
    for bad, feature in checks:
        if bad:
            raise _unsupported(feature, target)


def _rope_fields(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.yarn_factor > 1:
        params = {
            "rope_type": "yarn", "type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.yarn_factor,
            "original_max_position_embeddings": cfg.yarn_original_max_seq_len,
            "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow,
            "mscale": cfg.yarn_mscale, "mscale_all_dim": cfg.yarn_mscale_all_dim,
        }
    elif cfg.rope_scaling != "none":
        params = {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor}
        if cfg.rope_scaling == "llama3":
            params.update(low_freq_factor=cfg.llama3_low_freq_factor, high_freq_factor=cfg.llama3_high_freq_factor,
                          original_max_position_embeddings=cfg.llama3_original_max_seq_len)
    # rope_parameters for transformers >= 5, rope_theta/rope_scaling for older readers (v4, vLLM)
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta,
            "rope_scaling": params if params["rope_type"] != "default" else None}


def to_hf_config(cfg: ModelConfig, dtype: str = "float32", token_ids: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for the transformers class `hf_model_type(cfg)` selects.

    token_ids: bos_token_id / eos_token_id (an id or a list) / pad_token_id, written as given.
    """
    model_type = hf_model_type(cfg)
    target = ARCHITECTURES[model_type]
    _check_common(cfg, target)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
    out: dict[str, Any] = {
        "architectures": [target], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_dropout": 0.0, "use_cache": True, **ids,
        "torch_dtype": dtype, "dtype": dtype,
        **_rope_fields(cfg),
    }
    if model_type in (LLAMA, QWEN2):
        if cfg.rope_interleave:
            raise _unsupported("rope_interleave=true", target, "it rotates half-split pairs")
        if cfg.yarn_factor > 1 and cfg.yarn_mscale_all_dim:
            raise _unsupported("yarn_mscale_all_dim (softmax-scale mscale)", target)
        if cfg.d_model % cfg.n_heads:
            raise _unsupported(f"d_model={cfg.d_model} not divisible by n_heads={cfg.n_heads}", target)
        out.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
        if model_type == QWEN2:  # q/k/v biases are built in; no sliding window
            out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        else:
            out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        return out

    if (cfg.q_lora_rank or cfg.kv_latent_norm) and cfg.latent_eps != DEEPSEEK_LATENT_NORM_EPS:  # a latent norm to export
        raise _unsupported(f"latent norm eps {cfg.latent_eps} (latent_norm_eps, default norm_eps)", target,
                           f"its q/kv latent norms always use eps={DEEPSEEK_LATENT_NORM_EPS}")
    moe = cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers
    out.update(
        attention_bias=False,
        num_key_value_heads=cfg.n_heads,  # MLA has no KV heads; transformers' attention wants H here
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        first_k_dense_replace=cfg.first_k_dense_layers if moe else cfg.n_layers,
        n_routed_experts=cfg.n_routed_experts if moe else 0,
        n_shared_experts=cfg.n_shared_experts if moe else 0,
        num_experts_per_tok=cfg.experts_per_token if moe else 1,
        moe_intermediate_size=cfg.moe_d_ff if moe else 1,
        n_group=cfg.n_expert_groups if moe else 1, topk_group=cfg.topk_groups if moe else 1,
        routed_scaling_factor=cfg.routed_scaling_factor if moe else 1.0,
        norm_topk_prob=cfg.norm_topk_prob if moe else True,
    )
    if model_type == DEEPSEEK_V3:
        if moe and cfg.n_routed_experts // cfg.n_expert_groups < 2:
            raise _unsupported("expert groups of one expert", target, "its group score is the sum of the top-2 experts")
        out.update(rope_interleave=cfg.rope_interleave, num_nextn_predict_layers=0,
                   topk_method="noaux_tc", scoring_func="sigmoid")
        return out
    # DeepseekV2: softmax scores, greedy or group-limited (max) top-k, no bias, no top-k renormalization
    if cfg.norm_topk_prob:
        raise _unsupported("norm_topk_prob=true with softmax scoring", target, "its router never renormalizes")
    if not cfg.rope_interleave:
        raise _unsupported("rope_interleave=false", target, "its rope rotates interleaved pairs")
    if cfg.d_model % cfg.n_heads:
        raise _unsupported(f"d_model={cfg.d_model} not divisible by n_heads={cfg.n_heads}", target)
    out.update(topk_method="group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy", mlp_bias=False,
               scoring_func="softmax")
    return out


# -- HF -> ours ------------------------------------------------------------------------------

_REQUIRED = object()
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}


def _get(hf: dict[str, Any], key: str, typ: type, default: Any = _REQUIRED, positive: bool = False,
         where: str = "config.json") -> Any:
    """hf[key] checked to be of `typ` (null or absent: `default`, or an error if it is required)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{where}: required field {key!r} is missing")
        return default
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {int: numeric and float(value).is_integer(), float: numeric and math.isfinite(value),
          bool: isinstance(value, bool), str: isinstance(value, str), dict: isinstance(value, dict)}[typ]
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ValueError(f"{where}: field {key!r} must be {_TYPE_NAMES[typ]}, got {shown}")
    if positive and value <= 0:
        raise ValueError(f"{where}: field {key!r} must be positive, got {value!r}")
    return int(value) if typ is int else float(value) if typ is float else value


def _rope_params(hf: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The rope dict transformers reads and its name: rope_scaling when it is non-empty, else
    rope_parameters (PreTrainedConfig.convert_rope_params_to_dict: `rope_scaling or rope_parameters`)."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    return _get(hf, key, dict, {}), f"config.json {key}"


def _original_max_pos(hf: dict[str, Any], params: dict[str, Any], where: str, max_pos: int) -> int:
    """The pretraining context of llama3 and yarn rope as transformers resolves it
    (standardize_rope_params): a top-level original_max_position_embeddings wins over the rope
    dict's (Phi-3 style configs), and max_position_embeddings stands in when neither has one."""
    key = "original_max_position_embeddings"
    if key in hf:  # present even as null: transformers then uses the null and cannot load the model
        if hf[key] is None:
            raise ValueError(f"config.json: field {key!r} is null (transformers applies it to the rope and fails)")
        return _get(hf, key, int, positive=True)
    return _get(params, key, int, max_pos, positive=True, where=where)


def _rope_from_hf(hf: dict[str, Any], head_dim: int, family: str, max_pos: int) -> dict[str, Any]:
    params, where = _rope_params(hf)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("cannot convert: per-layer rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = _get(params, "rope_theta", float, None, positive=True, where=where) or _get(hf, "rope_theta", float, 10000.0, positive=True)
    out: dict[str, Any] = {"rope_theta": theta}
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"cannot convert: rope type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)} are)")
    if _get(params, "partial_rotary_factor", float, _get(hf, "partial_rotary_factor", float, 1.0), where=where) != 1.0:
        raise ValueError("cannot convert: partial_rotary_factor is not supported")
    if rope_type == "default":
        return out
    if rope_type in ("linear", "dynamic", "llama3"):
        factor = _get(params, "factor", float, where=where)
        if factor < 1:
            raise ValueError(f"cannot convert: {rope_type} rope factor {factor} < 1 is not supported")
        out.update(rope_scaling=rope_type, rope_scaling_factor=factor)
        if rope_type == "llama3":
            out.update(llama3_low_freq_factor=_get(params, "low_freq_factor", float, positive=True, where=where),
                       llama3_high_freq_factor=_get(params, "high_freq_factor", float, positive=True, where=where),
                       llama3_original_max_seq_len=_original_max_pos(hf, params, where, max_pos))
        return out
    if params.get("truncate", True) is False:
        raise ValueError("cannot convert: yarn with truncate=false is not supported")
    orig = _original_max_pos(hf, params, where, max_pos)
    factor = _get(params, "factor", float, max_pos / orig, where=where)
    mscale = _get(params, "mscale", float, None, where=where) or 1.0
    mscale_all = _get(params, "mscale_all_dim", float, None, where=where) or 0.0
    out.update(yarn_factor=factor, yarn_original_max_seq_len=orig,
               yarn_beta_fast=_get(params, "beta_fast", float, None, where=where) or 32.0,
               yarn_beta_slow=_get(params, "beta_slow", float, None, where=where) or 1.0,
               yarn_mscale=mscale, yarn_mscale_all_dim=mscale_all)
    if family == LLAMA and mscale_all and factor > 1:
        raise ValueError("cannot convert: yarn mscale_all_dim with Llama (its softmax scale ignores it, ours would not)")
    attention_factor = _get(params, "attention_factor", float, None, where=where)
    if attention_factor is not None:
        from latentformer.model.rope import rope_inv_freq

        probe = ModelConfig(attention="mha", n_heads=1, d_model=head_dim, **out)
        if not math.isclose(rope_inv_freq(probe)[1], attention_factor, rel_tol=1e-6):
            raise ValueError("cannot convert: an explicit yarn attention_factor different from YaRN's own is not supported")
    return out


def _require(hf: dict[str, Any], key: str, ok: Any, feature: str) -> None:
    value = hf.get(key, ok)
    if value != ok and not (ok is None and value in (0, False)):
        raise ValueError(f"cannot convert: {feature} ({key}={value!r}) is not supported")


def _check_sliding_window(hf: dict[str, Any], model_type: str, n_layers: int, max_pos: int) -> None:
    """A window of at least the whole context changes nothing (every key is within it); a shorter one is refused."""
    window = _get(hf, "sliding_window", int, None)
    if model_type == QWEN2:  # as Qwen2Config: the window applies only with use_sliding_window, to layers >= max_window_layers
        if not _get(hf, "use_sliding_window", bool, False):
            return
        layer_types = hf.get("layer_types")
        if isinstance(layer_types, list):
            if "sliding_attention" not in layer_types:
                return
        elif n_layers <= _get(hf, "max_window_layers", int, 28):
            return
    if window is not None and window < max_pos:
        raise ValueError(f"cannot convert: sliding-window attention (sliding_window={window} < "
                         f"max_position_embeddings={max_pos}) is not supported")


def from_hf_config(hf: Any) -> ModelConfig:
    """ModelConfig with the same math as the transformers model that config.json describes."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in FAMILY:
        raise ValueError(f"cannot convert model_type {model_type!r}: supported are {', '.join(FAMILY)}")
    family = FAMILY[model_type]
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(f"cannot convert: quantized checkpoints ({method}) are not supported; use a bf16/fp32 one")
    _require(hf, "hidden_act", "silu", "an activation other than SiLU")
    _require(hf, "attention_bias", False, "attention bias on all four projections (Llama's attention_bias)")
    _require(hf, "mlp_bias", False, "MLP bias")
    d = _get(hf, "hidden_size", int, positive=True)
    H = _get(hf, "num_attention_heads", int, positive=True)
    n_layers = _get(hf, "num_hidden_layers", int, positive=True)
    max_pos = _get(hf, "max_position_embeddings", int, MAX_POSITIONS[model_type], positive=True)
    if family == LLAMA:
        _check_sliding_window(hf, model_type, n_layers, max_pos)
    else:
        _require(hf, "sliding_window", None, "sliding-window attention")
    eps = _get(hf, "rms_norm_eps", float, 1e-6, positive=True)
    common = dict(
        vocab_size=_get(hf, "vocab_size", int, positive=True), n_layers=n_layers, d_model=d, n_heads=H,
        max_seq_len=max_pos, d_ff=_get(hf, "intermediate_size", int, positive=True), norm_eps=eps,
        tie_embeddings=_get(hf, "tie_word_embeddings", bool, False), init_std=_get(hf, "initializer_range", float, 0.02),
    )
    if family == LLAMA:
        if d % H and hf.get("head_dim") is None:
            raise ValueError(f"config.json: hidden_size={d} is not divisible by num_attention_heads={H} and head_dim is not given")
        head_dim = _get(hf, "head_dim", int, d // H, positive=True)
        n_kv = _get(hf, "num_key_value_heads", int, H, positive=True)
        if H % n_kv:
            raise ValueError(f"config.json: num_attention_heads={H} is not divisible by num_key_value_heads={n_kv}")
        kind = "mha" if n_kv == H else "mqa" if n_kv == 1 else "gqa"
        return ModelConfig(attention=kind, n_kv_heads=n_kv, head_dim=head_dim, rope_interleave=False,
                           qkv_bias=model_type == QWEN2, **_rope_from_hf(hf, head_dim, family, max_pos), **common)

    n_kv = _get(hf, "num_key_value_heads", int, H)
    if n_kv != H:
        raise ValueError(f"cannot convert: num_key_value_heads={n_kv} != num_attention_heads={H} in an MLA model")
    _require(hf, "moe_layer_freq", 1, "MoE layers at a stride")
    dr = _get(hf, "qk_rope_head_dim", int, positive=True)
    mla = dict(attention="mla", q_lora_rank=_get(hf, "q_lora_rank", int, 0),
               kv_lora_rank=_get(hf, "kv_lora_rank", int, positive=True),
               qk_nope_head_dim=_get(hf, "qk_nope_head_dim", int, positive=True), qk_rope_head_dim=dr,
               v_head_dim=_get(hf, "v_head_dim", int, positive=True),
               rope_interleave=_get(hf, "rope_interleave", bool, True) if family == DEEPSEEK_V3 else True,
               latent_norm_eps=None if eps == DEEPSEEK_LATENT_NORM_EPS else DEEPSEEK_LATENT_NORM_EPS,
               **_rope_from_hf(hf, dr, family, max_pos))
    first_dense = _get(hf, "first_k_dense_replace", int, 0)
    E = _get(hf, "n_routed_experts", int, 0)
    if not E or first_dense >= n_layers:
        return ModelConfig(**mla, **common)
    moe = dict(n_routed_experts=E, n_shared_experts=_get(hf, "n_shared_experts", int, 0),
               experts_per_token=_get(hf, "num_experts_per_tok", int, positive=True),
               moe_d_ff=_get(hf, "moe_intermediate_size", int, positive=True),
               routed_scaling_factor=_get(hf, "routed_scaling_factor", float, 1.0), first_k_dense_layers=first_dense)
    if family == DEEPSEEK_V3:
        _require(hf, "scoring_func", "sigmoid", "a router scoring other than sigmoid")
        return ModelConfig(router_scoring="sigmoid", n_expert_groups=_get(hf, "n_group", int, 1),
                           topk_groups=_get(hf, "topk_group", int, 1),
                           norm_topk_prob=_get(hf, "norm_topk_prob", bool, True), **moe, **mla, **common)
    _require(hf, "scoring_func", "softmax", "a router scoring other than softmax")
    if _get(hf, "norm_topk_prob", bool, False):
        raise ValueError("cannot convert: norm_topk_prob=true in DeepseekV2 (transformers' DeepseekV2 ignores it; the model is ambiguous)")
    method = _get(hf, "topk_method", str, "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"cannot convert: DeepseekV2 topk_method {method!r} is not supported")
    limited = method == "group_limited_greedy"
    return ModelConfig(router_scoring="softmax", norm_topk_prob=False,
                       n_expert_groups=_get(hf, "n_group", int) if limited else 1,
                       topk_groups=_get(hf, "topk_group", int) if limited else 1,
                       **moe, **mla, **common)
