"""Attention: MHA/GQA/MQA (one class, `n_kv_heads`) and Multi-head Latent Attention.

Shape legend: B batch, T new tokens, S keys (cache slots 0..end), H query heads,
Hk key/value heads, D head_dim. MLA dims (DeepSeek-V2 §2.1):
  dn = qk_nope_head_dim  per-head query/key part without position
  dr = qk_rope_head_dim  per-head query rope part; the rope KEY is one [dr] vector shared by all heads
  dv = v_head_dim        per-head value
  r  = kv_lora_rank      the cached latent c_kv
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from latentformer.config import ModelConfig
from latentformer.kernels import decode_gemm, mla_decode
from latentformer.model.norm import RMSNorm
from latentformer.model.rope import apply_rope

_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class AttnContext:
    """What every layer needs for one forward, built once by the Transformer.

    cos/sin: [B|1, T, rope_dim/2] or None (rope off).
    start:   cache slot of the first new token (0 without a cache).
    mask:    bool [B|1, 1, T, S], True = may attend; None means plain causal over the T new
             tokens (start == 0) or everything cached (T == 1).
    pad:     [B] left-padding slots per row (ragged batches), or None.
    slots/end: static addressing for CUDA-graph capture: the new tokens go to the device index
             tensor `slots` [T], attention covers the whole buffer, masked to the device scalar
             `end` (valid slots after the write); `start` is then unused. None otherwise.
    arrivals: the cache's scratch counter for the fused MLA decode kernel (`KVCache.arrivals`), or None.
    """

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    start: int
    mask: torch.Tensor | None
    pad: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    end: torch.Tensor | None = None
    arrivals: torch.Tensor | None = None

    def write(self, buf: torch.Tensor, dim: int, new: torch.Tensor) -> torch.Tensor:
        """Store `new` (T tokens along `dim`) in the cache buffer; return the slots to attend over."""
        if self.slots is not None:
            return buf.index_copy_(dim, self.slots, new)
        T = new.shape[dim]
        buf.narrow(dim, self.start, T).copy_(new)  # written once, rotated once: never re-rotated
        return buf.narrow(dim, 0, self.start + T)

    @property
    def reads_cache(self) -> bool:
        """False for a prefill from an empty cache: attention needs only the new tokens."""
        return self.slots is not None or self.start > 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v with SDPA. q [B,H,T,Dq], k [B,Hk,S,Dq], v [B,Hk,S,Dv] -> [B,H,T,Dv]."""
    H, Hk = q.shape[1], k.shape[1]
    causal = mask is None and q.shape[2] > 1
    if H != Hk and not _SDPA_GQA:
        k = k.repeat_interleave(H // Hk, dim=1)
        v = v.repeat_interleave(H // Hk, dim=1)
    kwargs = {"enable_gqa": True} if H != Hk and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=causal, scale=scale, **kwargs)


# The module of each attention kind (config.ATTENTION_KINDS), filled by `attention_kinds`: the one
# place where a kind becomes a class. Every module answers for itself, from the config alone:
#   make_cache(batch, seq, dtype, device) -> the layer's cache buffers (instance method)
#   cache_values_per_token(cfg) -> values the layer caches per token (bytes: times the dtype's itemsize)
#   describe(cfg) -> one line naming the attention and its cache-relevant shape
ATTENTION_MODULES: dict[str, type[nn.Module]] = {}


def attention_kinds(*kinds: str):
    """Class decorator: register the module as the attention of `kinds`."""
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        for kind in kinds:
            assert kind not in ATTENTION_MODULES, f"attention kind {kind!r} registered twice"
            ATTENTION_MODULES[kind] = cls
        return cls
    return register


def attention_module(cfg: ModelConfig) -> type[nn.Module]:
    """The module class of `cfg.attention` (build it with `attention_module(cfg)(cfg)`)."""
    return ATTENTION_MODULES[cfg.attention]


@attention_kinds("mha", "gqa", "mqa")
class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads: MHA (Hk = H), GQA (1 < Hk < H), MQA (Hk = 1)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, (H + 2 * Hk) * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.d_model, bias=False)

    def make_cache(self, batch: int, seq: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        shape = (batch, self.cfg.n_kv_heads, seq, self.cfg.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def cache_values_per_token(cfg: ModelConfig) -> int:
        """K and V of every KV head: 2 Hk D."""
        return 2 * cfg.n_kv_heads * cfg.head_dim

    @staticmethod
    def describe(cfg: ModelConfig) -> str:
        return f"{cfg.attention.upper()} ({cfg.n_heads} heads, {cfg.n_kv_heads} KV heads of {cfg.head_dim})"

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hk, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = self.qkv_proj(x).view(B, T, H + 2 * Hk, D).split([H, Hk, Hk], dim=2)  # [B,T,*,D]
        if ctx.cos is not None:  # rotate each head separately, after the head split
            q = apply_rope(q, ctx.cos, ctx.sin, cfg.rope_interleave)
            k = apply_rope(k, ctx.cos, ctx.sin, cfg.rope_interleave)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,*,T,D]
        if cache is not None:
            k_all, v_all = ctx.write(cache[0], 2, k), ctx.write(cache[1], 2, v)
            if ctx.reads_cache:
                k, v = k_all, v_all
        dropout = cfg.dropout if self.training else 0.0
        out = attend(q, k, v, cfg.softmax_scale, ctx.mask, dropout)  # [B,H,T,D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


# Decoding can fold W_UK into the query projection and W_UV into o_proj ("merged" weights):
# two fewer matrix products per layer and step, for more weight bytes when r > dn, dv. At
# decode batch sizes a kernel costs a few microseconds, about what reading 8 MB takes at
# ~3 TB/s, so layers merge when that adds at most this many bytes (mla-125m: 1 MB, merged;
# DeepSeek-V2-Lite: 23 MB, not merged).
MERGE_MAX_EXTRA_BYTES = 8 * 2**20


class DecodeWeights(NamedTuple):
    """Weights of the absorbed decode path, built from the parameters (see MLA.decode_weights).

    w_in:  [rows, d_model] the query (or q_a) and kv_a projections as one matrix (one GEMM).
    w_q:   q_lora only: [H*(dq+dr), q_lora_rank], the query up-projection.
    w_out: merged only: [d_model, H*r] = o_proj o W_UV; None when W_UK/W_UV stay separate.
    """

    source: tuple
    w_in: torch.Tensor
    w_q: torch.Tensor | None
    w_out: torch.Tensor | None

    @property
    def merged(self) -> bool:
        """The query part yields q_lat directly (dq = r; W_UK folded in), not q_nope (dq = dn)."""
        return self.w_out is not None


@attention_kinds("mla")
class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3), parameter names as in transformers' DeepseekV3.

    q = q_b_proj(q_a_norm(q_a_proj(x))) if q_lora_rank else q_proj(x)      [B,T,H,dn+dr]
    [c_kv, k_pe] = kv_a_proj(x); c_kv = kv_a_norm(c_kv)                    [B,T,r], [B,T,dr]
    [k_nope, v] = kv_b_proj(c_kv) per head                                 [B,S,H,dn], [B,S,H,dv]
    score_h = (q_nope_h . k_nope_h + rope(q_pe_h) . rope(k_pe)) * softmax_scale
    Training and prefill use this expanded form. Decoding with `mla_decode="absorb"` folds
    W_UK into the query and W_UV into the output and attends over the cached latent directly:
    q_lat_h = W_UK_h^T q_nope_h [r]; score_h = q_lat_h . c_kv + q_pe_h . k_pe;
    o_h = W_UV_h (softmax . c_kv). The projections it needs are rebuilt from the parameters
    whenever those change (`decode_weights`); they are not saved and carry no gradient.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, dn, dr, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.latent_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (dn + dr), bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, H * (dn + dr), bias=False)
        self.kv_a_proj = nn.Linear(cfg.d_model, r + dr, bias=False)
        self.kv_a_norm = RMSNorm(r, cfg.latent_eps)
        self.kv_b_proj = nn.Linear(r, H * (dn + dv), bias=False)
        self.o_proj = nn.Linear(H * dv, cfg.d_model, bias=False)
        self._decode_weights: DecodeWeights | None = None

    def make_cache(self, batch: int, seq: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        return (torch.zeros(batch, seq, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype=dtype, device=device),)

    @staticmethod
    def cache_values_per_token(cfg: ModelConfig) -> int:
        """The latent and the shared rope key, nothing else: r + dr (DeepSeek-V2 §2.1.3)."""
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim

    @staticmethod
    def describe(cfg: ModelConfig) -> str:
        q = f", q_lora_rank {cfg.q_lora_rank}" if cfg.q_lora_rank else ""
        return f"MLA (kv_lora_rank {cfg.kv_lora_rank}, rope {cfg.qk_rope_head_dim}{q}, {cfg.n_heads} heads)"

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank > 0:
            return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return self.q_proj(x)

    def _norm_rope(self, c_kv: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor,
                   ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent norm; per-head query rope and the one shared rope key."""
        c_kv = self.kv_a_norm(c_kv)
        if ctx.cos is not None:
            q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, self.cfg.rope_interleave)
            k_pe = apply_rope(k_pe[:, :, None, :], ctx.cos, ctx.sin, self.cfg.rope_interleave)[:, :, 0]
        return c_kv, q_pe, k_pe

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        cfg = self.cfg
        if cache is not None and ctx.reads_cache and cfg.mla_decode == "absorb":
            return self._absorbed(x, ctx, cache[0])
        B, T, _ = x.shape
        H, dn, dr, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q_nope, q_pe = self._query(x).view(B, T, H, dn + dr).split([dn, dr], dim=-1)  # [B,T,H,dn], [B,T,H,dr]
        c_kv, k_pe = self.kv_a_proj(x).split([r, dr], dim=-1)  # [B,T,r], [B,T,dr]
        c_kv, q_pe, k_pe = self._norm_rope(c_kv, q_pe, k_pe, ctx)
        if cache is not None:
            latent = ctx.write(cache[0], 1, torch.cat((c_kv, k_pe), dim=-1))  # [B,S,r+dr]
            if ctx.reads_cache:  # naive decode: expand the whole cached latent
                c_kv, k_pe = latent.split([r, dr], dim=-1)
        return self._expanded(q_nope, q_pe, c_kv, k_pe, ctx.mask)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Non-absorbed attention: expand the latent to per-head keys/values. Returns [B,T,d_model]."""
        cfg = self.cfg
        B, T, H = q_nope.shape[0], q_nope.shape[1], cfg.n_heads
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        S = c_kv.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, dn + dv).split([dn, dv], dim=-1)  # [B,S,H,dn], [B,S,H,dv]
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B,H,T,dn+dr]
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, dr)), dim=-1).transpose(1, 2)  # [B,H,S,dn+dr]
        dropout = cfg.dropout if self.training else 0.0
        out = attend(q, k, v.transpose(1, 2), cfg.softmax_scale, mask, dropout)  # [B,H,T,dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * dv))

    def _merge(self, dtype: torch.dtype) -> bool:
        cfg = self.cfg
        H, dn, dv, r, d = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.d_model
        q_in = cfg.q_lora_rank or d
        extra = H * q_in * (r - dn) - H * dn * r + d * H * (r - dv) - H * dv * r  # merged - separate elements
        return extra * dtype.itemsize <= MERGE_MAX_EXTRA_BYTES

    def decode_weights(self) -> DecodeWeights:
        """The absorbed decode path's weights, rebuilt (in fp32, stored in the parameters' dtype)
        when a parameter they derive from was replaced, moved or modified in place since the last build.
        Inside torch.compile the last build is used as is (`Transformer.prepare_decode` builds it first)."""
        cfg = self.cfg
        params = [p.weight for p in (getattr(self, "q_a_proj", None), getattr(self, "q_b_proj", None),
                                     getattr(self, "q_proj", None), self.kv_a_proj, self.kv_b_proj, self.o_proj) if p is not None]
        cached = self._decode_weights
        if cached is not None and (torch.compiler.is_compiling() or all(
                a is p and ptr == p.data_ptr() and ver == p._version for (a, ptr, ver), p in zip(cached.source, params))):
            return cached
        H, dn, dr, dv, r, d = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.d_model
        dtype = self.kv_b_proj.weight.dtype
        with torch.no_grad():
            q_up = (self.q_b_proj if cfg.q_lora_rank else self.q_proj).weight.float()
            wq = q_up.view(H, dn + dr, -1)  # [H, dn+dr, in]
            w_out = None
            if self._merge(dtype):
                kv_b = self.kv_b_proj.weight.float().view(H, dn + dv, r)
                q_lat = torch.einsum("hnr,hni->hri", kv_b[:, :dn], wq[:, :dn])  # [H, r, in]
                wq = torch.cat((q_lat, wq[:, dn:]), dim=1)  # [H, r+dr, in]
                w_o = self.o_proj.weight.float().view(d, H, dv)
                w_out = torch.einsum("dhv,hvr->dhr", w_o, kv_b[:, dn:]).reshape(d, H * r).to(dtype)
            wq = wq.reshape(-1, wq.shape[-1]).to(dtype)
            if cfg.q_lora_rank:
                w_in, w_q = torch.cat((self.q_a_proj.weight, self.kv_a_proj.weight)), wq
            else:
                w_in, w_q = torch.cat((wq, self.kv_a_proj.weight)), None
        source = tuple((p, p.data_ptr(), p._version) for p in params)
        self._decode_weights = DecodeWeights(source, w_in, w_q, w_out)
        return self._decode_weights

    def _absorbed(self, x: torch.Tensor, ctx: AttnContext, buf: torch.Tensor) -> torch.Tensor:
        """Attention in the latent space over the cache buffer [B,S_max,r+dr]. Returns [B,T,d_model]."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dr, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        w = self.decode_weights()
        h = decode_gemm.linear(x, w.w_in)  # decode_gemm: small-batch products on CUDA, else F.linear
        q_rows = h.shape[-1] - r - dr
        q, c_kv, k_pe = h.split([q_rows, r, dr], dim=-1)
        if w.w_q is not None:
            q = decode_gemm.linear(self.q_a_norm(q), w.w_q)
        dq = r if w.merged else dn
        q_x, q_pe = q.view(B, T, H, dq + dr).split([dq, dr], dim=-1)  # [B,T,H,dq], [B,T,H,dr]
        kv_b = self.kv_b_proj.weight.view(H, dn + dv, r)  # W_UK = kv_b[:, :dn], W_UV = kv_b[:, dn:]
        q_lat = q_x.transpose(1, 2) if w.merged else torch.einsum("bthn,hnr->bhtr", q_x, kv_b[:, :dn])  # [B,H,T,r]
        if mla_decode.supported(buf, r, dr, T):
            # the kernel normalizes and rotates the new token, caches it and rotates the query itself
            latent = buf if ctx.slots is not None else buf.narrow(1, 0, ctx.start + T)  # new token: slot S - 1
            new = mla_decode.NewToken(h[:, 0, q_rows:], self.kv_a_norm.weight, self.kv_a_norm.eps,
                                      ctx.cos[:, 0], ctx.sin[:, 0], cfg.rope_interleave)
            o_lat = mla_decode.latent_decode_attention(q_lat[:, :, 0], q_pe[:, 0], latent, r, cfg.softmax_scale,
                                                       ctx.pad, ctx.end, arrivals=ctx.arrivals, new=new)[:, :, None]
        else:
            c_kv, q_pe, k_pe = self._norm_rope(c_kv, q_pe, k_pe, ctx)
            latent = ctx.write(buf, 1, torch.cat((c_kv, k_pe), dim=-1))  # [B,S,r+dr]
            q_pe = q_pe.transpose(1, 2)  # [B,H,T,dr]
            # all heads share one key/value "head" (the latent): plain matmuls read the cache
            # without expanding it per head; keys = [c_kv, k_pe], values = c_kv
            S = latent.shape[1]
            qk = torch.cat((q_lat, q_pe), dim=-1).reshape(B, H * T, r + dr)
            scores = torch.matmul(qk, latent.transpose(1, 2)).float() * cfg.softmax_scale  # [B,H*T,S]
            if ctx.mask is not None:
                scores = scores.view(B, H, T, S).masked_fill(~ctx.mask, float("-inf")).view(B, H * T, S)
            o_lat = torch.matmul(scores.softmax(-1).to(latent.dtype), latent[..., :r]).view(B, H, T, r)
        # the output product feeds the block's residual add: it may split K (decode_gemm.linear)
        if w.merged:
            return decode_gemm.linear(o_lat.transpose(1, 2).reshape(B, T, H * r), w.w_out, split_k=True)
        out = torch.einsum("bhtr,hvr->bthv", o_lat, kv_b[:, dn:])  # [B,T,H,dv]
        return decode_gemm.linear(out.reshape(B, T, H * dv), self.o_proj.weight, split_k=True)
