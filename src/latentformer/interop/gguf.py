"""GGUF files (llama.cpp's format), both ways.

Export (`export_gguf`): the Hugging Face export (`hf_config.to_hf_config`, `hf.to_hf_state`) is the
source, then what llama.cpp's convert_hf_to_gguf.py does with such a checkpoint (matched to the
llama.cpp bundled in llama-cpp-python 0.3.36): tensor names from the `gguf` package's
`TensorNameMap`, MLA as llama.cpp's `deepseek2` (kv_b_proj split into attn_k_b, transposed, and
attn_v_b, as its absorbed decode wants; experts stacked per layer; head_count_kv 1 and the
*_mla key/value lengths), MHA/GQA/MQA as `llama` (q/k rows permuted from the half-split rope
layout to llama.cpp's adjacent pairs), or `qwen2` with a q/k/v bias (half-split rope there too: no
permutation). The tokenizer goes in as a `gpt2` (byte-level BPE) vocabulary
with its merges, special tokens and chat template. What llama.cpp cannot express is a ValueError
naming the field (`check_gguf`).

Import: a `deepseek2` file is read here (`gguf.GGUFReader`), the inverse of the export; any other
architecture through transformers' GGUF reader, which reads the file's metadata into a config, dequantizes every tensor to fp32 and names it
as its own model would (`load_gguf_checkpoint`); the tokenizer it rebuilds from the file's vocabulary
is saved as tokenizer.json and read as any Hugging Face tokenizer. From there the import is the
Hugging Face one (`hf_config`, `hf.from_hf_state`), so a GGUF model is whatever its transformers
architecture is here (Llama, Qwen2, Mistral). Needs `transformers` and `gguf`
(pip install 'latentformer[gguf]'); accelerate, which transformers' own from_pretrained(gguf_file=)
wants, is not needed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from latentformer.config import ModelConfig
from latentformer.data.tokenizer import PretrainedTokenizer, Tokenizer
from latentformer.interop.hf import HF_LAYER, HF_TOP, checked_tokenizer, model_from_hf, to_hf_state
from latentformer.interop.hf_config import from_hf_config, to_hf_config
from latentformer.model.transformer import Transformer


class GGUFModel(NamedTuple):
    """What transformers reads from a GGUF file."""

    hf_config: dict[str, Any]  # config.json form
    tensors: dict[str, torch.Tensor]  # dequantized to fp32, under transformers' parameter names
    config: Any  # the transformers PretrainedConfig (to build transformers' own model of the file)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _decimal(value: float) -> float:
    """A GGUF float32 key as the shortest decimal that reads back as it: 1e-06, not 9.9999999747e-07."""
    import numpy as np

    return float(str(np.float32(value)))


def read_gguf(path: str | Path) -> GGUFModel:
    """Config and fp32 tensors of a GGUF file, through transformers' reader; one-line ValueErrors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such GGUF file: {path}")
    try:
        import gguf  # noqa: F401  (transformers' reader needs it; say so before it does, in one line)
        import transformers
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        raise ValueError("reading GGUF needs transformers and gguf: pip install 'latentformer[gguf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # the reader raises many types (unsupported architecture, bad magic, ...)
        raise ValueError(f"cannot read {path} as GGUF: {_first_line(e)}") from None
    hf_cfg = config.to_dict()
    for key in ("rms_norm_eps", "rope_theta"):  # float32 in the file
        if isinstance(hf_cfg.get(key), float):
            hf_cfg[key] = _decimal(hf_cfg[key])
    from_hf_config(hf_cfg)  # refuse an architecture we cannot express before dequantizing anything
    with torch.device("meta"):  # only its parameter names are used, to map GGUF's tensor names
        names = transformers.AutoModelForCausalLM.from_config(config)
    try:
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names)["tensors"]
    except Exception as e:
        raise ValueError(f"cannot read the tensors of {path}: {_first_line(e)}") from None
    return GGUFModel(hf_cfg, tensors, config)


def gguf_tokenizer(path: str | Path, hf_config: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer transformers rebuilds from a GGUF file's vocabulary, as an imported tokenizer
    (None, with a warning, when the file has none it can read)."""
    import gguf
    import transformers

    path = Path(path)
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # the file names its special tokens; transformers' reading of them differs between versions
        # (5.17 made <|im_start|> SmolLM2's eos_token and dropped its pad token)
        for name, i in special_ids(gguf.GGUFReader(str(path)).fields).items():
            if i is not None and i < len(hf_tok):
                setattr(hf_tok, f"{name}_token", hf_tok.convert_ids_to_tokens(i))
        with tempfile.TemporaryDirectory() as tmp:
            hf_tok.save_pretrained(tmp)
            return PretrainedTokenizer.from_hf_dir(tmp, hf_config)
    except Exception as e:  # a file without a usable vocabulary still gives the model
        warnings.warn(f"tokenizer not imported from {path.name}: {_first_line(e)}", stacklevel=2)
        return None


# GGUF matrix types whose dequantized values bfloat16 holds within a small part of the source's own
# quantization step: every block-quantized type of 8 bits or fewer, and bf16 and MXFP4 (whose values it
# holds exactly; NOTES.md, "Interop")
_BF16_ENOUGH = re.compile(r"BF16|MXFP4|I?Q[1-8](_[0-9A-Z]+)*|TQ[12]_0")


def import_dtype(matrix_types: set[str]) -> torch.dtype:
    """The checkpoint dtype that keeps a GGUF file's precision, from the types of its matrices
    (GGMLQuantizationType names; 1-D tensors, always F32, do not count): bfloat16 when every matrix
    is quantized (Q4_1, Q8_0, Q6_K, ...) or BF16, else float32 (an F32 source, and F16, whose values
    bfloat16 would round to 3 fewer mantissa bits and float16 compute could overflow)."""
    if matrix_types and all(_BF16_ENOUGH.fullmatch(t) for t in matrix_types):
        return torch.bfloat16
    return torch.float32


def matrix_types(path: str | Path) -> set[str]:
    """The GGMLQuantizationType names of a GGUF file's tensors of 2 or more dimensions."""
    from gguf import GGUFReader

    return {t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) >= 2}


def import_gguf(path: str | Path, dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer or None) from a GGUF file, in `dtype`, by default the one that keeps the
    source's precision (`import_dtype`)."""
    if _architecture(path) == _DEEPSEEK2:
        hf_cfg, tensors = read_deepseek2(path)
        tokenizer = gpt2_vocabulary(path)
    else:
        hf_cfg, tensors, _ = read_gguf(path)
        tokenizer = gguf_tokenizer(path, hf_cfg)
    model = model_from_hf(hf_cfg, tensors, str(path), dtype or import_dtype(matrix_types(path)))
    return model, checked_tokenizer(tokenizer, model.config)


# -- export: ours -> GGUF (llama.cpp) ----------------------------------------------------------

GGUF_DTYPES = ("float32", "float16", "bfloat16", "q8_0")
EXPORT_KEY = "latentformer.export"  # in every file export_gguf writes: `convert --force` replaces only those
# MLA's rope layout before export (llama.cpp's is interleaved): the import puts half-split rows back
ROPE_INTERLEAVE_KEY = "latentformer.rope_interleave"
_DEEPSEEK2, _LLAMA, _QWEN2 = "deepseek2", "llama", "qwen2"
_LITE_LAYERS = (26, 27)  # llama.cpp reads a deepseek2 file of this depth as V2-Lite (no q_lora_rank)


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for a model: deepseek2 (MLA, dense or MoE), llama (MHA/GQA/MQA) or,
    with a q/k/v bias, qwen2 (as the Hugging Face export: Qwen2ForCausalLM)."""
    if cfg.attention == "mla":
        return _DEEPSEEK2
    return _QWEN2 if cfg.qkv_bias else _LLAMA


def _gguf_package() -> Any:
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF files need the gguf package: pip install 'latentformer[gguf]'") from None
    return gguf


def _refused(feature: str, why: str) -> ValueError:
    return ValueError(f"cannot export to GGUF: {feature} ({why})")


def check_gguf(cfg: ModelConfig, tokenizer: Tokenizer | None) -> None:
    """ValueError naming the first field llama.cpp cannot express; the Hugging Face export's
    refusals (positions, norms, FFN kind, ...) come first, as the GGUF export is built on it."""
    to_hf_config(cfg)
    if cfg.attention == "mla":
        moe = cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers
        if not cfg.kv_latent_norm:
            raise _refused("kv_latent_norm=false", "llama.cpp's deepseek2 always normalizes the kv latent, and its f16 and "
                           "q8_0 weights cannot hold the tiny scaled projection that hides the norm in the Hugging Face export")
        if cfg.latent_eps != cfg.norm_eps:
            raise _refused(f"norm_eps={cfg.norm_eps}", f"deepseek2 uses one eps, and the latent norms' is {cfg.latent_eps}")
        if cfg.q_lora_rank and cfg.n_layers in _LITE_LAYERS:
            raise _refused(f"n_layers={cfg.n_layers} with q_lora_rank", "llama.cpp reads such a file as DeepSeek-V2-Lite, without q_lora_rank")
        if cfg.yarn_factor > 1 and cfg.yarn_mscale != cfg.yarn_mscale_all_dim:
            raise _refused(f"yarn_mscale={cfg.yarn_mscale} with yarn_mscale_all_dim={cfg.yarn_mscale_all_dim}",
                           "llama.cpp's deepseek2 YaRN matches DeepSeek's only when the two are equal, as in V2 and V3")
        if moe and cfg.n_shared_experts == 0:
            raise _refused("n_shared_experts=0", "deepseek2 always runs a shared expert")
        if moe and cfg.router_scoring == "softmax" and cfg.n_expert_groups > 1:
            raise _refused(f"n_expert_groups={cfg.n_expert_groups} with softmax scoring",
                           "llama.cpp scores a group by its top-2 sum, DeepSeek-V2 by its maximum")
    else:
        if cfg.yarn_factor > 1 or cfg.rope_scaling == "llama3":
            raise _refused("yarn_factor" if cfg.yarn_factor > 1 else "rope_scaling=llama3", "not written for llama; only linear")
    if tokenizer is None:
        raise _refused("no tokenizer", "llama.cpp needs the vocabulary in the file")
    _tokenizer_json(tokenizer)


def _tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizers JSON of a byte-level BPE whose pre-tokenizer is GPT-2's (llama.cpp's `gpt-2`)."""
    from latentformer.data.tokenizer import BPETokenizer
    from latentformer.interop.hf import gpt2_tokenizer_json

    if tokenizer.kind == "gpt2":
        tj = json.loads(gpt2_tokenizer_json())
    elif isinstance(tokenizer, BPETokenizer):
        tj = json.loads(tokenizer.to_json())
    else:
        raise _refused(f"tokenizer kind {tokenizer.kind}", "llama.cpp reads BPE vocabularies")
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    plain = (model.get("type") == "BPE" and model.get("dropout") is None and not model.get("continuing_subword_prefix")
             and not model.get("end_of_word_suffix") and tj.get("normalizer") is None and pre.get("type") == "ByteLevel"
             and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))
    if not plain:
        raise _refused("tokenizer", "not a byte-level BPE with GPT-2's pre-tokenizer and no normalizer, "
                       "which is what llama.cpp's gpt-2 tokenizer reproduces")
    return tj


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.*: every id's token (ids past the tokenizer's are unused padding), merges, types,
    special ids and the chat template, so that llama.cpp tokenizes to the same ids."""
    import gguf

    from latentformer.interop.hf import token_ids

    tj = _tokenizer_json(tokenizer)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in tj["model"]["vocab"].items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in tj.get("added_tokens", []):  # special: parsed only when asked; others: always (as tokenizers does)
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    ids = token_ids(tokenizer)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = ids[key][0] if isinstance(ids[key], list) else ids[key]
        if value is not None:
            add(value)
    writer.add_add_bos_token(False)  # ours prepend nothing; chat templates write their own bos
    writer.add_add_eos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


def _rope_pairs(w: torch.Tensor, heads: int, rows: int, start: int, rope_dim: int, back: bool = False) -> torch.Tensor:
    """Rows [start, start + rope_dim) of each head's `rows` rows, from the half-split rope layout
    (x_i pairs with x_{i+d/2}) to adjacent pairs (x_2i, x_2i+1), which llama.cpp's rope rotates
    (convert_hf_to_gguf's LlamaModel.permute); `back`: the inverse."""
    w = w.reshape(heads, rows, -1)
    split = (2, rope_dim // 2) if not back else (rope_dim // 2, 2)
    rope = w[:, start:start + rope_dim].reshape(heads, *split, -1).transpose(1, 2).reshape(heads, rope_dim, -1)
    return torch.cat((w[:, :start], rope, w[:, start + rope_dim:]), dim=1).reshape(heads * rows, -1)


def _name_map(cfg: ModelConfig) -> Any:
    import gguf

    arch = {_DEEPSEEK2: gguf.MODEL_ARCH.DEEPSEEK2, _LLAMA: gguf.MODEL_ARCH.LLAMA, _QWEN2: gguf.MODEL_ARCH.QWEN2}[gguf_architecture(cfg)]
    return gguf.get_tensor_name_map(arch, cfg.n_layers)


def _gguf_name(names: Any, hf_name: str) -> str:
    """llama.cpp's name of a transformers tensor (the `gguf` package's map, as convert_hf_to_gguf uses)."""
    name = names.get_name(hf_name.replace("e_score_correction_bias", "e_score_correction.bias"),
                          try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"cannot export parameter {hf_name!r} to GGUF: no llama.cpp counterpart")
    return name


def _mla_rope_pairs(key: str, t: torch.Tensor, cfg: ModelConfig, back: bool = False) -> torch.Tensor:
    """An MLA projection with half-split rope rows (rope_interleave=false) to or `back` from
    llama.cpp's adjacent pairs: the query's rope rows per head, the shared rope key's rows of kv_a."""
    if key in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
        return _rope_pairs(t, cfg.n_heads, cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, back)
    if key == "self_attn.kv_a_proj_with_mqa.weight":
        return _rope_pairs(t, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim, back)
    return t


def gguf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names and layouts (rows = output features, as torch)."""
    cfg = model.config
    names = _name_map(cfg)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in to_hf_state(model).items():
        m = re.fullmatch(r"(model\.layers\.\d+\.)(.+)", name)
        pre, key = (m[1], m[2]) if m else ("", name)
        if em := re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+)\.weight", key):
            experts.setdefault((pre, em[2]), {})[int(em[1])] = t
            continue
        if key == "self_attn.kv_b_proj.weight":  # [H(dn+dv), r] -> k_b [H, r, dn] and v_b [H, dv, r]
            k_b, v_b = t.reshape(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1).split(
                [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            out[_gguf_name(names, pre + "self_attn.k_b_proj.weight")] = k_b.transpose(1, 2)
            out[_gguf_name(names, pre + "self_attn.v_b_proj.weight")] = v_b
            continue
        if gguf_architecture(cfg) == _LLAMA and key in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            heads = cfg.n_heads if key.startswith("self_attn.q") else cfg.n_kv_heads
            t = _rope_pairs(t, heads, cfg.head_dim, 0, cfg.head_dim)
        elif cfg.attention == "mla" and not cfg.rope_interleave:
            t = _mla_rope_pairs(key, t, cfg)
        out[_gguf_name(names, name)] = t
    for (pre, proj), per_expert in experts.items():  # [E, out, in], as llama.cpp's *_exps
        out[_gguf_name(names, f"{pre}mlp.experts.{proj}.weight")] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def _gguf_array(t: torch.Tensor, dtype: str) -> tuple[Any, Any]:
    """(numpy data, GGMLQuantizationType): vectors stay F32 (as llama.cpp's converter keeps them);
    a Q8_0 matrix whose rows are not whole 32-value blocks falls back to F16, as there."""
    import gguf

    Q = gguf.GGMLQuantizationType
    data = t.detach().to(torch.float32).contiguous().numpy()
    if dtype == "float32" or t.ndim < 2:
        return data, Q.F32
    if dtype == "float16" or (dtype == "q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]):
        return data.astype("float16"), Q.F16
    qtype = Q.BF16 if dtype == "bfloat16" else Q.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


def _add_hparams(writer: Any, cfg: ModelConfig) -> None:
    import gguf

    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.attention != "mla":
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        if cfg.rope_scaling == "linear":  # dynamic: the same frequencies within the context
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
        return
    # deepseek2 with the absorbed (MLA) graph: one latent "KV head" of r + dr keys and r values;
    # the per-head sizes are the *_mla lengths (convert_hf_to_gguf's DeepseekV2Model)
    moe = cfg.is_moe and cfg.first_k_dense_layers < cfg.n_layers
    writer.add_head_count_kv(1)
    writer.add_leading_dense_block_count(cfg.first_k_dense_layers if moe else cfg.n_layers)
    writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    writer.add_bool(ROPE_INTERLEAVE_KEY, cfg.rope_interleave)
    writer.add_expert_feed_forward_length(cfg.moe_d_ff)
    writer.add_expert_shared_count(cfg.n_shared_experts if moe else 0)
    if moe:
        writer.add_expert_count(cfg.n_routed_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
        writer.add_expert_group_count(cfg.n_expert_groups)
        writer.add_expert_group_used_count(cfg.topk_groups)
        gating = gguf.ExpertGatingFuncType
        writer.add_expert_gating_func(gating.SIGMOID if cfg.router_scoring == "sigmoid" else gating.SOFTMAX)
        writer.add_expert_weights_scale(cfg.routed_scaling_factor)
        writer.add_expert_weights_norm(cfg.norm_topk_prob)
    if cfg.yarn_factor > 1:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.yarn_original_max_seq_len)
        writer.add_rope_scaling_yarn_beta_fast(cfg.yarn_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(cfg.yarn_beta_slow)
        # llama.cpp divides this key by 0.1 when it reads it (its TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        writer.add_rope_scaling_yarn_log_mul(0.1 * cfg.yarn_mscale_all_dim)


def exported_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file written by `export_gguf`."""
    try:
        return EXPORT_KEY in _gguf_package().GGUFReader(str(path)).fields
    except Exception:  # not GGUF at all: the reader raises on bad magic, short files, ...
        return False


def export_gguf(model: Transformer, tokenizer: Tokenizer | None, out: str | Path, dtype: str = "float32") -> Path:
    """Write `out` as a GGUF file llama.cpp runs (written beside it, then renamed into place).
    dtype: float32 | float16 | bfloat16 | q8_0 for the matrices (vectors are always F32)."""
    gguf = _gguf_package()

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    cfg = model.config
    check_gguf(cfg, tokenizer)
    out = Path(out)
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf_architecture(cfg))
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(file_type)
        writer.add_bool(EXPORT_KEY, True)
        _add_hparams(writer, cfg)
        _add_tokenizer(writer, tokenizer, cfg.vocab_size)
        for name, t in gguf_state(model).items():
            data, qtype = _gguf_array(t, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- import of deepseek2 files: the inverse of the export ------------------------------------

def _architecture(path: str | Path) -> str | None:
    gguf = _gguf_package()
    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
    except Exception:  # not readable here: transformers' reader gives the one-line error
        return None
    return field.contents() if field is not None else None


def read_deepseek2(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json dict, fp32 tensors under transformers' names) of a llama.cpp deepseek2 file with
    the absorbed-MLA tensors (attn_k_b / attn_v_b), as `export_gguf` and convert_hf_to_gguf write."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))

    def key(name: str, default: Any = None) -> Any:
        field = reader.fields.get(f"{_DEEPSEEK2}.{name}")
        if field is None:
            if default is None:
                raise ValueError(f"{path}: GGUF key {_DEEPSEEK2}.{name} is missing")
            return default
        value = field.contents()
        return _decimal(value) if isinstance(value, float) else value

    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    if "blk.0.attn_kv_b.weight" in tensors:
        raise ValueError(f"{path}: a deepseek2 file with the unsplit attn_kv_b (written before llama.cpp's absorbed MLA) is not read here")
    n_layers, heads, dr = key("block_count"), key("attention.head_count"), key("rope.dimension_count")
    dense = key("leading_dense_block_count", 0)
    n_experts = key("expert_count", 0)
    moe = n_experts > 0 and dense < n_layers
    sigmoid = key("expert_gating_func", int(gguf.ExpertGatingFuncType.SOFTMAX)) == gguf.ExpertGatingFuncType.SIGMOID
    hf: dict[str, Any] = {
        "model_type": "deepseek_v3" if sigmoid or not moe else "deepseek_v2",
        "vocab_size": tensors["token_embd.weight"].shape[0], "hidden_size": key("embedding_length"),
        "num_hidden_layers": n_layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "intermediate_size": key("feed_forward_length"), "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "rope_theta": key("rope.freq_base"),
        "q_lora_rank": key("attention.q_lora_rank", 0) or None, "kv_lora_rank": key("attention.kv_lora_rank"),
        "qk_nope_head_dim": key("attention.key_length_mla") - dr, "qk_rope_head_dim": dr,
        "v_head_dim": key("attention.value_length_mla"),
        "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": "silu",
        "first_k_dense_replace": dense if moe else n_layers, "n_routed_experts": n_experts if moe else 0,
        "n_shared_experts": key("expert_shared_count", 0) if moe else 0,
        "num_experts_per_tok": key("expert_used_count", 1), "moe_intermediate_size": key("expert_feed_forward_length"),
        "n_group": key("expert_group_count", 1), "topk_group": key("expert_group_used_count", 1),
        "routed_scaling_factor": key("expert_weights_scale", 1.0), "norm_topk_prob": bool(key("expert_weights_norm", False)),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
    }
    if key("rope.scaling.type", "none") == "yarn":
        hf["rope_scaling"] = {
            "rope_type": "yarn", "factor": key("rope.scaling.factor"), "rope_theta": hf["rope_theta"],
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
            "beta_fast": key("rope.scaling.yarn_beta_fast", 32.0), "beta_slow": key("rope.scaling.yarn_beta_slow", 1.0),
            "mscale": key("rope.scaling.yarn_log_multiplier", 0.0) / 0.1,  # the export requires mscale == mscale_all_dim
            "mscale_all_dim": key("rope.scaling.yarn_log_multiplier", 0.0) / 0.1}
    # a file from elsewhere has llama.cpp's interleaved layout; ours says what the model had
    field = reader.fields.get(ROPE_INTERLEAVE_KEY)
    hf["rope_interleave"] = True if field is None else bool(field.contents())
    cfg = from_hf_config(hf)
    names = _name_map(cfg)
    layer_names = [*HF_LAYER.values(), "self_attn.k_b_proj.weight", "self_attn.v_b_proj.weight",
                   *(f"mlp.experts.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))]
    hf_name = {_gguf_name(names, n): n for n in HF_TOP.values()}
    hf_name.update({_gguf_name(names, f"model.layers.{i}.{n}"): f"model.layers.{i}.{n}"
                    for i in range(n_layers) for n in layer_names if n.endswith(("weight", "bias"))})
    out: dict[str, torch.Tensor] = {}
    for gname, t in tensors.items():
        if gname not in hf_name:
            raise ValueError(f"{path}: unexpected tensor {gname} in a deepseek2 file")
        name = hf_name[gname]
        if em := re.fullmatch(r"(.+\.mlp\.experts)\.(\w+)\.weight", name):  # [E, out, in] -> one per expert
            out.update({f"{em[1]}.{e}.{em[2]}.weight": w for e, w in enumerate(t)})
        elif not name.endswith(("k_b_proj.weight", "v_b_proj.weight")):
            out[name] = t if cfg.rope_interleave else _mla_rope_pairs(name.split(".", 3)[-1], t, cfg, back=True)
    for i in range(n_layers):  # k_b [H, r, dn] and v_b [H, dv, r] -> kv_b_proj [H(dn+dv), r]
        pre = f"model.layers.{i}.self_attn."
        try:
            k_b, v_b = (tensors[_gguf_name(names, f"{pre}{p}_b_proj.weight")] for p in "kv")
        except KeyError as e:
            raise ValueError(f"{path}: tensor {e.args[0]} is missing") from None
        out[pre + "kv_b_proj.weight"] = torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1])
    return hf, out


def special_ids(fields: dict[str, Any]) -> dict[str, int | None]:
    """bos/eos/pad/unk -> the id a GGUF file's metadata (`GGUFReader.fields`) names, or None: the
    spec's keys tokenizer.ggml.bos_token_id, eos_token_id, padding_token_id and unknown_token_id."""
    import gguf

    keys = gguf.Keys.Tokenizer
    return {name: int(fields[key].contents()) if key in fields else None
            for name, key in (("bos", keys.BOS_ID), ("eos", keys.EOS_ID), ("pad", keys.PAD_ID), ("unk", keys.UNK_ID))}


def gpt2_vocabulary(path: str | Path) -> Tokenizer | None:
    """The byte-level BPE of a GGUF file whose vocabulary is llama.cpp's `gpt2` model with the
    `gpt-2` pre-tokenizer (what `export_gguf` writes; transformers reads no deepseek2 file), as an
    imported tokenizer with its special tokens and chat template; None, with a warning, otherwise."""
    import gguf
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    fields = gguf.GGUFReader(str(path)).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    if value("tokenizer.ggml.model") != "gpt2" or value("tokenizer.ggml.pre") != "gpt-2":
        warnings.warn(f"tokenizer not imported from {Path(path).name}: not a gpt2 vocabulary with the gpt-2 "
                      "pre-tokenizer", stacklevel=2)
        return None
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != gguf.TokenType.UNUSED}
    tk = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    for i, kind in enumerate(types):  # added tokens keep their ids (they are in the vocabulary above)
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            tk.add_tokens([AddedToken(tokens[i], special=kind == gguf.TokenType.CONTROL, normalized=False)])
    special: dict[str, Any] = {}
    for name, i in special_ids(fields).items():
        special[f"{name}_token"] = tokens[i] if i is not None else None
        if name != "unk":
            special[f"{name}_token_id"] = i
    return PretrainedTokenizer(tk, special, value("tokenizer.chat_template"), source=str(path))
