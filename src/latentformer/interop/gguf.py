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

import tempfile
import warnings
from pathlib import Path

import torch

from latentformer.checkpoint import model_from_state
from latentformer.data.tokenizer import PretrainedTokenizer, Tokenizer
from latentformer.interop.hf import checked_tokenizer, from_hf_state
from latentformer.interop.hf_config import from_hf_config
from latentformer.model.transformer import Transformer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(config.json dict, fp32 tensors under transformers' names, the transformers config) of a GGUF file."""
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
    return hf_cfg, tensors, config


def _gguf_tokenizer(path: Path, hf_cfg: dict) -> Tokenizer | None:
    import transformers

    try:
        hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with tempfile.TemporaryDirectory() as tmp:
            hf_tok.save_pretrained(tmp)
            return PretrainedTokenizer.from_hf_dir(tmp, hf_cfg)
    except Exception as e:  # a file without a usable vocabulary still gives the model
        warnings.warn(f"tokenizer not imported from {path.name}: {_first_line(e)}", stacklevel=3)
        return None


def import_gguf(path: str | Path, dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer or None) from a GGUF file; weights dequantized to fp32 (or `dtype`)."""
    path = Path(path)
    hf_cfg, tensors, _ = read_gguf(path)
    cfg = from_hf_config(hf_cfg)
    model = model_from_state(cfg, from_hf_state(tensors, cfg), str(path))
    return model.to(dtype or torch.float32).eval(), checked_tokenizer(_gguf_tokenizer(path, hf_cfg), cfg)
