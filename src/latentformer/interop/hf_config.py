"""ModelConfig <-> Hugging Face config.json (DeepseekV3, DeepseekV2, Llama), both ways.

Targets (the transformers classes whose math we match):
  MLA, dense or sigmoid-scored MoE  -> DeepseekV3ForCausalLM
  MLA with softmax-scored MoE        -> DeepseekV2ForCausalLM
  MHA / GQA / MQA, dense             -> LlamaForCausalLM
A feature the target cannot express is a ValueError naming it: a conversion never yields a
silently different model. transformers itself is not needed here (config.json is plain JSON).
"""

from __future__ import annotations

import math
from typing import Any

from latentformer.config import ModelConfig

LLAMA, DEEPSEEK_V2, DEEPSEEK_V3 = "llama", "deepseek_v2", "deepseek_v3"
ARCHITECTURES = {LLAMA: "LlamaForCausalLM", DEEPSEEK_V2: "DeepseekV2ForCausalLM", DEEPSEEK_V3: "DeepseekV3ForCausalLM"}
# transformers' DeepSeek attention builds q_a_layernorm/kv_a_layernorm with the default eps,
# whatever rms_norm_eps says; our MLA uses norm_eps for them, so the two must agree.
DEEPSEEK_LATENT_NORM_EPS = 1e-6


def _unsupported(feature: str, target: str, why: str = "") -> ValueError:
    return ValueError(f"cannot convert: {feature} is not expressible in {target}{' (' + why + ')' if why else ''}")


# -- ours -> HF ------------------------------------------------------------------------------

def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type a model exports to (ValueError if there is none)."""
    if cfg.attention == "mla":
        if cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers and cfg.router_scoring == "softmax":
            return DEEPSEEK_V2
        return DEEPSEEK_V3
    if cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers:
        raise _unsupported(f"a Mixture-of-Experts FFN with attention={cfg.attention}", "LlamaForCausalLM",
                           "MoE exports only with attention=mla, as DeepSeek")
    return LLAMA


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
    # rope_parameters for transformers >= 5, rope_theta/rope_scaling for older readers (v4, vLLM)
    return {"rope_parameters": params, "rope_theta": cfg.rope_theta,
            "rope_scaling": params if cfg.yarn_factor > 1 else None}


def to_hf_config(cfg: ModelConfig, dtype: str = "float32", eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json for the transformers class `hf_model_type(cfg)` selects."""
    model_type = hf_model_type(cfg)
    target = ARCHITECTURES[model_type]
    _check_common(cfg, target)
    out: dict[str, Any] = {
        "architectures": [target], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_bias": False, "attention_dropout": 0.0, "use_cache": True,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None,
        "torch_dtype": dtype, "dtype": dtype,
        **_rope_fields(cfg),
    }
    if model_type == LLAMA:
        if cfg.rope_interleave:
            raise _unsupported("rope_interleave=true", target, "Llama rotates half-split pairs")
        if cfg.yarn_factor > 1 and cfg.yarn_mscale_all_dim:
            raise _unsupported("yarn_mscale_all_dim (softmax-scale mscale)", target)
        if cfg.d_model % cfg.n_heads:
            raise _unsupported(f"d_model={cfg.d_model} not divisible by n_heads={cfg.n_heads}", target)
        out.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, mlp_bias=False, pretraining_tp=1)
        return out

    if cfg.norm_eps != DEEPSEEK_LATENT_NORM_EPS:
        raise _unsupported(f"norm_eps={cfg.norm_eps}", target, f"its q/kv latent norms always use eps={DEEPSEEK_LATENT_NORM_EPS}")
    moe = cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers
    out.update(
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

def _rope_from_hf(hf: dict[str, Any], head_dim: int, model_type: str) -> dict[str, Any]:
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError("cannot convert: per-layer rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    out: dict[str, Any] = {"rope_theta": theta}
    if rope_type == "default":
        return out
    if rope_type != "yarn":
        raise ValueError(f"cannot convert: rope type {rope_type!r} is not supported (default and yarn are)")
    if params.get("truncate", True) is False:
        raise ValueError("cannot convert: yarn with truncate=false is not supported")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("cannot convert: partial_rotary_factor is not supported")
    orig = int(params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096))
    factor = params.get("factor") or hf["max_position_embeddings"] / orig
    mscale, mscale_all = float(params.get("mscale") or 1.0), float(params.get("mscale_all_dim") or 0.0)
    out.update(yarn_factor=float(factor), yarn_original_max_seq_len=orig,
               yarn_beta_fast=float(params.get("beta_fast") or 32), yarn_beta_slow=float(params.get("beta_slow") or 1),
               yarn_mscale=mscale, yarn_mscale_all_dim=mscale_all)
    if model_type == LLAMA and mscale_all and factor > 1:
        raise ValueError("cannot convert: yarn mscale_all_dim with Llama (its softmax scale ignores it, ours would not)")
    if params.get("attention_factor") is not None:
        from latentformer.model.rope import rope_inv_freq

        probe = ModelConfig(attention="mha", n_heads=1, d_model=head_dim, **out)
        if not math.isclose(rope_inv_freq(probe)[1], float(params["attention_factor"]), rel_tol=1e-6):
            raise ValueError("cannot convert: an explicit yarn attention_factor different from YaRN's own is not supported")
    return out


def _require(hf: dict[str, Any], key: str, ok: Any, feature: str) -> None:
    value = hf.get(key, ok)
    if value != ok and not (ok is None and value in (0, False)):
        raise ValueError(f"cannot convert: {feature} ({key}={value!r}) is not supported")


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig with the same math as the transformers model that config.json describes."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"cannot convert model_type {model_type!r}: supported are {', '.join(ARCHITECTURES)}")
    if hf.get("quantization_config"):
        raise ValueError(f"cannot convert: quantized checkpoints ({hf['quantization_config'].get('quant_method', '?')}) are not supported; use a bf16/fp32 one")
    _require(hf, "hidden_act", "silu", "an activation other than SiLU")
    _require(hf, "attention_bias", False, "attention bias")
    _require(hf, "mlp_bias", False, "MLP bias")
    _require(hf, "sliding_window", None, "sliding-window attention")
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    eps = float(hf.get("rms_norm_eps", 1e-6))
    common = dict(
        vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], d_model=d, n_heads=H,
        max_seq_len=hf.get("max_position_embeddings", 2048), d_ff=hf["intermediate_size"], norm_eps=eps,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
    )
    if model_type == LLAMA:
        head_dim = hf.get("head_dim") or d // H
        n_kv = hf.get("num_key_value_heads") or H
        kind = "mha" if n_kv == H else "mqa" if n_kv == 1 else "gqa"
        return ModelConfig(attention=kind, n_kv_heads=n_kv, head_dim=head_dim, rope_interleave=False,
                           **_rope_from_hf(hf, head_dim, model_type), **common)

    if eps != DEEPSEEK_LATENT_NORM_EPS:
        raise ValueError(f"cannot convert: rms_norm_eps={eps} (transformers' DeepSeek uses {DEEPSEEK_LATENT_NORM_EPS} for the latent norms; ours would not)")
    if hf.get("num_key_value_heads") not in (None, H):
        raise ValueError(f"cannot convert: num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={H} in an MLA model")
    _require(hf, "moe_layer_freq", 1, "MoE layers at a stride")
    dr = hf["qk_rope_head_dim"]
    mla = dict(attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
               qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=dr, v_head_dim=hf["v_head_dim"],
               rope_interleave=bool(hf.get("rope_interleave", True)) if model_type == DEEPSEEK_V3 else True,
               **_rope_from_hf(hf, dr, model_type))
    n_layers = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace") or 0
    E = hf.get("n_routed_experts") or 0
    if not E or first_dense >= n_layers:
        return ModelConfig(**mla, **common)
    moe = dict(n_routed_experts=E, n_shared_experts=hf.get("n_shared_experts") or 0,
               experts_per_token=hf["num_experts_per_tok"], moe_d_ff=hf["moe_intermediate_size"],
               routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), first_k_dense_layers=first_dense)
    if model_type == DEEPSEEK_V3:
        _require(hf, "scoring_func", "sigmoid", "a router scoring other than sigmoid")
        groups = hf.get("n_group") or 1
        return ModelConfig(router_scoring="sigmoid", n_expert_groups=groups, topk_groups=hf.get("topk_group") or 1,
                           norm_topk_prob=bool(hf.get("norm_topk_prob", True)), **moe, **mla, **common)
    _require(hf, "scoring_func", "softmax", "a router scoring other than softmax")
    if hf.get("norm_topk_prob"):
        raise ValueError("cannot convert: norm_topk_prob=true in DeepseekV2 (transformers' DeepseekV2 ignores it; the model is ambiguous)")
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"cannot convert: DeepseekV2 topk_method {method!r} is not supported")
    limited = method == "group_limited_greedy"
    return ModelConfig(router_scoring="softmax", norm_topk_prob=False,
                       n_expert_groups=hf["n_group"] if limited else 1, topk_groups=hf["topk_group"] if limited else 1,
                       **moe, **mla, **common)
