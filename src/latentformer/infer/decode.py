"""The decode layer: the model's incremental forward, with decode-speed implementations.

`Decoder(model, cache)` runs what `model(tokens, cache=cache)` computes, block by block through the
model's own modules (`Block.compose`), with three substitutions that change the speed, not the math:

- MLA attention in the absorbed form (`mla_decode="absorb"`, the default; `"naive"` keeps the model's
  expanded form, the oracle) with weights derived from the parameters (`DecodeWeights`), and on CUDA
  the fused Triton kernel (kernels/mla_decode.py), which also finishes and caches the new token;
- SwiGLU FFNs through the small-batch products of kernels/decode_gemm.py (fused gate/up/SiLU; the
  products before a residual add split K under torch.compile);
- with `static=True`, device-side cache addressing over the whole buffer (`Transformer.row_context`,
  `RowContext`): the new tokens' slots and the attended lengths come from `cache.length`, so one step
  can be captured in a CUDA graph and replayed at every position (infer/cuda_graph.py). Eager decoding
  keeps the model's addressing, which reads only the slots written so far.

Shape legend as in model/attention.py: H heads, dn/dr/dv per-head nope/rope/value dims, r kv_lora_rank.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch

from latentformer.kernels import decode_gemm, mla_decode
from latentformer.model.attention import MLA, AttnContext, latent_attention
from latentformer.model.cache import KVCache
from latentformer.model.ffn import SwiGLU
from latentformer.model.transformer import Transformer

MLA_DECODE = ("absorb", "naive")

# Decoding can fold W_UK into the query projection and W_UV into o_proj ("merged" weights):
# two fewer matrix products per layer and step, for more weight bytes when r > dn, dv. At
# decode batch sizes a kernel costs a few microseconds, about what reading 8 MB takes at
# ~3 TB/s, so layers merge when that adds at most this many bytes (mla-125m: 1 MB, merged;
# DeepSeek-V2-Lite: 23 MB, not merged).
MERGE_MAX_EXTRA_BYTES = 8 * 2**20


def merges(attn: MLA, dtype: torch.dtype) -> bool:
    """Whether W_UK/W_UV fold into the projections (at most MERGE_MAX_EXTRA_BYTES more weight bytes)."""
    cfg = attn.cfg
    H, dn, dv, r, d = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.d_model
    q_in = cfg.q_lora_rank or d
    extra = H * q_in * (r - dn) - H * dn * r + d * H * (r - dv) - H * dv * r  # merged - separate elements
    return extra * dtype.itemsize <= MERGE_MAX_EXTRA_BYTES


def _sources(attn: MLA) -> list[torch.Tensor]:
    """The parameters the decode weights derive from."""
    return [m.weight for m in (getattr(attn, "q_a_proj", None), getattr(attn, "q_b_proj", None),
                               getattr(attn, "q_proj", None), attn.kv_a_proj, attn.kv_b_proj, attn.o_proj) if m is not None]


class DecodeWeights(NamedTuple):
    """Weights of the absorbed decode path of one MLA layer, derived from its parameters.

    w_in:  [rows, d_model] the query (or q_a) and kv_a projections as one matrix (one GEMM).
    w_q:   q_lora only: [H*(dq+dr), q_lora_rank], the query up-projection.
    w_out: merged only: [d_model, H*r] = o_proj o W_UV; None when W_UK/W_UV stay separate.
    dq is r when merged (W_UK folded into the query rows: they yield q_lat), else dn.
    Built in fp32, stored in the parameters' dtype; never checkpointed, no gradient.
    """

    source: tuple  # (parameter, data_ptr, _version) per source parameter at build time
    w_in: torch.Tensor
    w_q: torch.Tensor | None
    w_out: torch.Tensor | None

    @property
    def merged(self) -> bool:
        return self.w_out is not None

    def current(self, attn: MLA) -> bool:
        """False once a source parameter was replaced, moved or modified in place since the build."""
        return all(a is p and ptr == p.data_ptr() and ver == p._version
                   for (a, ptr, ver), p in zip(self.source, _sources(attn)))

    @staticmethod
    def build(attn: MLA) -> DecodeWeights:
        cfg = attn.cfg
        H, dn, dr, dv, r, d = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.d_model
        dtype = attn.kv_b_proj.weight.dtype
        with torch.no_grad():
            q_up = (attn.q_b_proj if cfg.q_lora_rank else attn.q_proj).weight.float()
            wq = q_up.view(H, dn + dr, -1)  # [H, dn+dr, in]
            w_out = None
            if merges(attn, dtype):
                kv_b = attn.kv_b_proj.weight.float().view(H, dn + dv, r)
                q_lat = torch.einsum("hnr,hni->hri", kv_b[:, :dn], wq[:, :dn])  # [H, r, in]
                wq = torch.cat((q_lat, wq[:, dn:]), dim=1)  # [H, r+dr, in]
                w_o = attn.o_proj.weight.float().view(d, H, dv)
                w_out = torch.einsum("dhv,hvr->dhr", w_o, kv_b[:, dn:]).reshape(d, H * r).to(dtype)
            wq = wq.reshape(-1, wq.shape[-1]).to(dtype)
            if cfg.q_lora_rank:
                w_in, w_q = torch.cat((attn.q_a_proj.weight, attn.kv_a_proj.weight)), wq
            else:
                w_in, w_q = torch.cat((wq, attn.kv_a_proj.weight)), None
        source = tuple((p, p.data_ptr(), p._version) for p in _sources(attn))
        return DecodeWeights(source, w_in, w_q, w_out)


def _swiglu(ffn: SwiGLU, h: torch.Tensor) -> torch.Tensor:
    """SwiGLU through decode_gemm: decode-sized inputs on CUDA take gate, up and SiLU in one Triton pass."""
    y = decode_gemm.swiglu(h, ffn.gate_proj.weight, ffn.up_proj.weight)
    return decode_gemm.linear(y, ffn.down_proj.weight, split_k=True)  # feeds the residual add


class Decoder:
    """`decoder(tokens [B, T]) -> logits [B, T, vocab]`: `model`'s incremental forward over `cache`
    (advancing it), for decoding. `mla_decode`: "absorb" (default) or "naive" (the model's expanded
    form, the oracle); `static`: device-side addressing (see the module docstring).

    The absorbed path's weights are built here from the parameters and rebuilt, eagerly, whenever a
    parameter they derive from changes; inside torch.compile the build that exists at tracing is used
    (weights changed during one compiled generation are not seen). Projections are read as weights,
    not run as modules, so a model with LoRA adapters not yet merged into its weights is refused."""

    def __init__(self, model: Transformer, cache: KVCache, mla_decode: str = "absorb", static: bool = False) -> None:
        if mla_decode not in MLA_DECODE:
            raise ValueError(f"mla_decode must be 'absorb' or 'naive', got {mla_decode!r}")
        if any(type(m).__module__.startswith("peft.") for m in model.modules()):
            raise ValueError("the model carries LoRA adapters that are not merged into its weights, which the decode "
                             "layer reads: merge them first (latentformer.train.lora.merge)")
        self.model, self.cache, self.static = model, cache, static
        self.absorb = model.config.attention == "mla" and mla_decode == "absorb"
        self.weights: list[DecodeWeights | None] = [DecodeWeights.build(b.attn) if self.absorb else None for b in model.layers]
        # the fused kernel's per-row counter; every launch leaves it at zero, so no step zeroes a new one
        self.arrivals = torch.zeros(cache.batch_size, dtype=torch.int32, device=cache.length.device)
        self._ffns: list[Callable[[torch.Tensor], torch.Tensor]] = [
            partial(_swiglu, b.ffn) if isinstance(b.ffn, SwiGLU) else b.ffn for b in model.layers]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        model, cache = self.model, self.cache
        model.check_input(tokens, cache)
        # static: per-row device-side addressing over the whole buffer, what a CUDA graph captures
        x, ctx = model.row_context(tokens, cache, None) if self.static else model.context(tokens, cache)
        for i, blk in enumerate(model.layers):
            x = blk.compose(x, partial(self._attention, i, ctx), self._ffns[i])
        logits = model.head(x)
        cache.advance(tokens.shape[1])
        return logits

    def _attention(self, i: int, ctx: AttnContext, h: torch.Tensor) -> torch.Tensor:
        attn, layer = self.model.layers[i].attn, self.cache.layers[i]
        if self.absorb and ctx.reads_cache:
            return self._absorbed(i, attn, h, ctx, layer[0])
        return attn(h, ctx, layer)

    def _decode_weights(self, i: int, attn: MLA) -> DecodeWeights:
        w = self.weights[i]
        if not (torch.compiler.is_compiling() or w.current(attn)):
            w = self.weights[i] = DecodeWeights.build(attn)
        return w

    def _absorbed(self, i: int, attn: MLA, x: torch.Tensor, ctx: AttnContext, buf: torch.Tensor) -> torch.Tensor:
        """MLA.absorbed with the merged weights, over the cache buffer [B,S_max,r+dr]; the fused kernel
        on CUDA (one token), else latent_attention. Returns [B,T,d_model]."""
        cfg = attn.cfg
        B, T, _ = x.shape
        H, dn, dr, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        w = self._decode_weights(i, attn)
        h = decode_gemm.linear(x, w.w_in)  # decode_gemm: small-batch products on CUDA, else F.linear
        q_rows = h.shape[-1] - r - dr
        q, c_kv, k_pe = h.split([q_rows, r, dr], dim=-1)
        if w.w_q is not None:
            q = decode_gemm.linear(attn.q_a_norm(q), w.w_q)
        dq = r if w.merged else dn
        q_x, q_pe = q.view(B, T, H, dq + dr).split([dq, dr], dim=-1)  # [B,T,H,dq], [B,T,H,dr]
        kv_b = attn.kv_b_proj.weight.view(H, dn + dv, r)  # W_UK = kv_b[:, :dn], W_UV = kv_b[:, dn:]
        q_lat = q_x.transpose(1, 2) if w.merged else torch.einsum("bthn,hnr->bhtr", q_x, kv_b[:, :dn])  # [B,H,T,r]
        if mla_decode.supported(buf, r, dr, T):
            # the kernel normalizes and rotates the new token, caches it and rotates the query itself
            latent = ctx.keys(buf, 1, T)  # the new token's slot: each row's last valid one
            norm = (attn.kv_a_norm.weight, attn.kv_a_norm.eps) if cfg.kv_latent_norm else (None, 0.0)  # else an identity
            new = mla_decode.NewToken(h[:, 0, q_rows:], *norm, ctx.cos[:, 0], ctx.sin[:, 0], cfg.rope_interleave)
            o_lat = mla_decode.latent_decode_attention(q_lat[:, :, 0], q_pe[:, 0], latent, r, cfg.softmax_scale, ctx.pad,
                                                       ctx.end, arrivals=self.arrivals, new=new)[:, :, None]
        else:
            c_kv, q_pe, k_pe = attn.norm_rope(c_kv, q_pe, k_pe, ctx)
            latent = ctx.write(buf, 1, torch.cat((c_kv, k_pe), dim=-1))  # [B,S,r+dr]
            o_lat = latent_attention(q_lat, q_pe.transpose(1, 2), latent, cfg.softmax_scale, ctx.mask)  # [B,H,T,r]
        # the output product feeds the block's residual add: it may split K (decode_gemm.linear)
        if w.merged:
            return decode_gemm.linear(o_lat.transpose(1, 2).reshape(B, T, H * r), w.w_out, split_k=True)
        out = torch.einsum("bhtr,hvr->bthv", o_lat, kv_b[:, dn:])  # [B,T,H,dv]
        return decode_gemm.linear(out.reshape(B, T, H * dv), attn.o_proj.weight, split_k=True)
