"""latentformer: Multi-head Latent Attention language models, from a laptop to a GPU node."""

from latentformer.config import ModelConfig
from latentformer.model.transformer import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "load", "generate", "__version__"]


def __getattr__(name: str):
    # load/generate pull in the tokenizer and inference stack; import them on first use
    if name == "load":
        from latentformer.checkpoint import load

        return load
    if name == "generate":
        from latentformer.infer.generate import generate

        return generate
    raise AttributeError(f"module 'latentformer' has no attribute {name!r}")
