"""The attention registry: every kind of the config has its module, and a module answers for itself
(cache layout and size, description), so a new kind needs no branch anywhere else."""

import json

import pytest
import torch

from latentformer import ModelConfig, Transformer
from latentformer import config as config_module
from latentformer.cli.info import describe
from latentformer.config import ATTENTION_FIELDS, ATTENTION_KINDS
from latentformer.data.tokenizer import ByteTokenizer
from latentformer.interop.hf_config import hf_model_type
from latentformer.interop.to_mla import check_source
from latentformer.model import attention as attention_module_file
from latentformer.model.attention import ATTENTION_MODULES, MLA, Attention, attention_kinds, attention_module
from latentformer.serve.model_card import attention_summary, model_card

from .helpers import ATTENTION, small


def test_every_kind_has_a_module_and_every_module_a_kind():
    assert set(ATTENTION_MODULES) == set(ATTENTION_KINDS) == set(ATTENTION_FIELDS)
    assert {k: ATTENTION_MODULES[k] for k in ATTENTION_KINDS} == {"mha": Attention, "gqa": Attention, "mqa": Attention, "mla": MLA}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_blocks_use_the_registered_module(name):
    cfg = small(**ATTENTION[name])
    model = Transformer(cfg)
    assert all(type(blk.attn) is attention_module(cfg) for blk in model.layers)
    assert attention_summary(cfg) == attention_module(cfg).describe(cfg)


class KeyOnlyValues(Attention):
    """A hypothetical kind for the test: values are the keys (K = V), so only K is cached."""

    def make_cache(self, batch, seq, dtype, device):
        k, _ = super().make_cache(batch, seq, dtype, device)
        return (k,)

    @staticmethod
    def cache_values_per_token(cfg):
        return cfg.n_kv_heads * cfg.head_dim

    @staticmethod
    def describe(cfg):
        return f"KOV ({cfg.n_heads} heads, {cfg.n_kv_heads} shared K=V heads of {cfg.head_dim})"

    def forward(self, x, ctx, cache=None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, _ = self.qkv_proj(x).view(B, T, H + 2 * Hk, D).split([H, Hk, Hk], dim=2)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cache is not None:
            k_all = ctx.write(cache[0], 2, k)
            if ctx.reads_cache:
                k = k_all
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(H // Hk, 1), k.repeat_interleave(H // Hk, 1), is_causal=ctx.mask is None and T > 1,
            attn_mask=ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


def test_a_new_kind_needs_the_config_and_its_module_only(monkeypatch):
    # the two edits a new kind makes (config.py: its fields; model/attention.py: its module, registered) ...
    monkeypatch.setattr(config_module, "ATTENTION_FIELDS", {**ATTENTION_FIELDS, "kov": ATTENTION_FIELDS["gqa"]})
    monkeypatch.setattr(config_module, "ATTENTION_KINDS", (*ATTENTION_KINDS, "kov"))
    monkeypatch.setattr(attention_module_file, "ATTENTION_MODULES", dict(ATTENTION_MODULES))
    attention_kinds("kov")(KeyOnlyValues)
    # ... and the model, its cache, its accounting, the model card and `info` follow
    cfg = small(attention="kov", n_kv_heads=2, rope=False, pos_embedding="learned")
    with pytest.raises(ValueError, match="^kv_lora_rank: is a field of attention mla, unused by attention kov"):
        cfg.replace(kv_lora_rank=8)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    assert isinstance(model.layers[0].attn, KeyOnlyValues)
    cache = model.make_cache(2, 16)
    # Hk D per layer (K only), 2 layers, fp32
    assert model.kv_cache_bytes_per_token() == 2 * 8 * 2 * 4 and cache.nbytes == model.kv_cache_bytes_per_token() * 2 * 16
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    full = model(tokens)
    steps = torch.cat([model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 9)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)  # the cache it sized is the cache it reads
    assert model_card(model, torch.float32).attention == "KOV (4 heads, 2 shared K=V heads of 8)"
    info = describe(model, ByteTokenizer())
    assert info["attention"] == {"kind": "kov", "n_heads": 4, "summary": "KOV (4 heads, 2 shared K=V heads of 8)",
                                 "n_kv_heads": 2, "head_dim": 8}
    json.dumps(info)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # formats that know the existing kinds only refuse it rather than write another model
    with pytest.raises(ValueError, match="attention=kov is not expressible in LlamaForCausalLM"):
        hf_model_type(cfg)
    with pytest.raises(ValueError, match="attention is kov"):
        check_source(cfg)
