"""GGUF files (llama.cpp's format) -> our model, through transformers' GGUF reader.

transformers reads the file's metadata into a config, dequantizes every tensor to fp32 and names it
as its own model would (`load_gguf_checkpoint`); the tokenizer it rebuilds from the file's vocabulary
is saved as tokenizer.json and read as any Hugging Face tokenizer. From there the import is the
Hugging Face one (`hf_config`, `hf.from_hf_state`), so a GGUF model is whatever its transformers
architecture is here (Llama, Qwen2, Mistral). Needs `transformers` and `gguf`
(pip install 'latentformer[gguf]'); accelerate, which transformers' own from_pretrained(gguf_file=)
wants, is not needed.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from latentformer.data.tokenizer import PretrainedTokenizer, Tokenizer
from latentformer.interop.hf import checked_tokenizer, model_from_hf
from latentformer.interop.hf_config import from_hf_config
from latentformer.model.transformer import Transformer


class GGUFModel(NamedTuple):
    """What transformers reads from a GGUF file."""

    hf_config: dict[str, Any]  # config.json form
    tensors: dict[str, torch.Tensor]  # dequantized to fp32, under transformers' parameter names
    config: Any  # the transformers PretrainedConfig (to build transformers' own model of the file)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    import transformers

    path = Path(path)
    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
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
    hf_cfg, tensors, _ = read_gguf(path)
    model = model_from_hf(hf_cfg, tensors, str(path), dtype or import_dtype(matrix_types(path)))
    return model, checked_tokenizer(gguf_tokenizer(path, hf_cfg), model.config)
