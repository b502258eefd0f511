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

import torch
import torch.nn.functional as F
from torch import nn

from latentformer.config import ModelConfig
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

    The new tokens go to slots start..start+T-1 and attention reads slots 0..start+T-1. `RowContext`
    addresses each row on its own instead (ragged caches, CUDA-graph decode steps).
    """

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    start: int
    mask: torch.Tensor | None
    pad: torch.Tensor | None = None

    def write(self, buf: torch.Tensor, dim: int, new: torch.Tensor) -> torch.Tensor:
        """Store `new` (T tokens along `dim`) in the cache buffer; return the slots to attend over."""
        T = new.shape[dim]
        buf.narrow(dim, self.start, T).copy_(new)  # written once, rotated once: never re-rotated
        return self.keys(buf, dim, T)

    def keys(self, buf: torch.Tensor, dim: int, T: int) -> torch.Tensor:
        """The cache slots attention reads once T new tokens are written."""
        return buf.narrow(dim, 0, self.start + T)

    @property
    def end(self) -> torch.Tensor | None:
        """Valid slots per row after the write, on the device [B] (None: every slot that `keys` returns)."""
        return None

    @property
    def reads_cache(self) -> bool:
        """False for a prefill from an empty cache: attention needs only the new tokens."""
        return self.start > 0


@dataclass(kw_only=True)
class RowContext(AttnContext):
    """Per-row cache addressing on the device: row b's new tokens go to `slots[b]` ([B, T], from
    the cache's per-row `length`), so rows of different lengths decode together (a ragged cache)
    and one captured CUDA graph serves every position. Attention reads slots 0..span-1 of every row
    (`span` None: the whole buffer, as a captured graph must), masked per row by `mask`;
    `start` is unused."""

    slots: torch.Tensor
    span: int | None

    def write(self, buf: torch.Tensor, dim: int, new: torch.Tensor) -> torch.Tensor:
        # an index_put_ (row b, slots[b] along `dim`), not a scatter_: torch.compile writes an index_put_
        # in place, while a scatter_ into a graph input becomes a copy of the whole cache per write
        # (NOTES.md: 4.8x slower MHA decode at batch 64 x 8k)
        B, T = self.slots.shape
        rows = torch.arange(B, device=buf.device)[:, None]  # [B, 1]
        buf[(rows,) + (slice(None),) * (dim - 1) + (self.slots,)] = new.movedim(dim, 1)  # indexed view [B, T, ...]
        return self.keys(buf, dim, T)

    def keys(self, buf: torch.Tensor, dim: int, T: int) -> torch.Tensor:
        return buf if self.span is None else buf.narrow(dim, 0, self.span)

    @property
    def end(self) -> torch.Tensor:
        return self.slots[:, -1] + 1

    @property
    def reads_cache(self) -> bool:
        return True


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v with SDPA. q [B,H,T,Dq], k [B,Hk,S,Dq], v [B,Hk,S,Dv] -> [B,H,T,Dv].

    Grouped queries (H = G Hk, query head h reads KV head h // G) in fp32 under a mask or for one new
    token attend as G T query rows of their KV head, the mask repeated per group: SDPA's half-precision
    kernels take `enable_gqa`, but in fp32 it falls to the math kernel, which copies K and V per query
    head. In bf16 / fp16 the folded rows would cost parallelism (B Hk programs, not B H, each reading
    all S slots: 1.3-2x slower decode steps on an H100, NOTES.md), so those keep `enable_gqa`."""
    B, H, T, Dq = q.shape
    Hk = k.shape[1]
    causal = mask is None and T > 1
    if H != Hk and not causal and q.dtype not in (torch.float16, torch.bfloat16):
        G = H // Hk
        rows = q.reshape(B, Hk, G * T, Dq)  # row g T + t = head hk G + g, token t
        if mask is not None and T > 1:
            mask = torch.cat([mask] * G, dim=-2)  # [B|1, 1, G T, S]
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        return out.reshape(B, H, T, v.shape[-1])
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


def latent_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, scale: float,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention in MLA's latent space: every head attends over the one cached latent 'head'
    (keys [c_kv, k_pe], values c_kv), read as is, never expanded per head.

    q_lat [B,H,T,r] (q_nope absorbed through W_UK), q_pe [B,H,T,dr] rotated, latent [B,S,r+dr],
    mask bool [B|1,1,T,S] or None (every slot) -> o_lat [B,H,T,r] in the latent's dtype."""
    B, H, T, r = q_lat.shape
    S = latent.shape[1]
    qk = torch.cat((q_lat, q_pe), dim=-1).reshape(B, H * T, -1)  # [B,H*T,r+dr]
    scores = torch.matmul(qk, latent.transpose(1, 2)).float() * scale  # [B,H*T,S]
    if mask is not None:
        scores = scores.view(B, H, T, S).masked_fill(~mask, float("-inf")).view(B, H * T, S)
    return torch.matmul(scores.softmax(-1).to(latent.dtype), latent[..., :r]).view(B, H, T, r)


@attention_kinds("mla")
class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3), parameter names as in transformers' DeepseekV3.

    q = q_b_proj(q_a_norm(q_a_proj(x))) if q_lora_rank else q_proj(x)      [B,T,H,dn+dr]
    [c_kv, k_pe] = kv_a_proj(x); c_kv = kv_a_norm(c_kv)                    [B,T,r], [B,T,dr]
                                       (kv_a_norm: identity when kv_latent_norm is false)
    [k_nope, v] = kv_b_proj(c_kv) per head                                 [B,S,H,dn], [B,S,H,dv]
    score_h = (q_nope_h . k_nope_h + rope(q_pe_h) . rope(k_pe)) * softmax_scale

    `forward` is this expanded form (training, prefill, and the naive decode oracle). `absorbed`
    is the same attention over the cached latent (DeepSeek-V2 §2.1.3): W_UK folded into the query
    and W_UV applied after attention, so no per-head keys or values are ever formed. The decode
    layer (latentformer.infer.decode) runs that form with merged weights and fused kernels.
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
        self.kv_a_norm = RMSNorm(r, cfg.latent_eps) if cfg.kv_latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(r, H * (dn + dv), bias=False)
        self.o_proj = nn.Linear(H * dv, cfg.d_model, bias=False)

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

    def _project(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, ...]:
        """x [B,T,d] -> q_nope [B,T,H,dn], rotated q_pe [B,T,H,dr], normalized c_kv [B,T,r], rotated k_pe [B,T,dr]."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dr, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if cfg.q_lora_rank > 0 else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split([r, dr], dim=-1)
        c_kv, q_pe, k_pe = self.norm_rope(c_kv, q_pe, k_pe, ctx)
        return q_nope, q_pe, c_kv, k_pe

    def norm_rope(self, c_kv: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor,
                  ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent norm; per-head query rope and the one shared rope key (rotated after the head split)."""
        c_kv = self.kv_a_norm(c_kv)
        if ctx.cos is not None:
            q_pe = apply_rope(q_pe, ctx.cos, ctx.sin, self.cfg.rope_interleave)
            k_pe = apply_rope(k_pe[:, :, None, :], ctx.cos, ctx.sin, self.cfg.rope_interleave)[:, :, 0]
        return c_kv, q_pe, k_pe

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The expanded form: the latent goes through W_UK/W_UV into per-head keys and values. Returns [B,T,d_model]."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dr, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_nope, q_pe, c_kv, k_pe = self._project(x, ctx)
        if cache is not None:
            latent = ctx.write(cache[0], 1, torch.cat((c_kv, k_pe), dim=-1))  # [B,S,r+dr]
            if ctx.reads_cache:  # decoding: expand the whole cached latent
                c_kv, k_pe = latent.split([r, dr], dim=-1)
        S = c_kv.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, dn + dv).split([dn, dv], dim=-1)  # [B,S,H,dn], [B,S,H,dv]
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B,H,T,dn+dr]
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, dr)), dim=-1).transpose(1, 2)  # [B,H,S,dn+dr]
        dropout = cfg.dropout if self.training else 0.0
        out = attend(q, k, v.transpose(1, 2), cfg.softmax_scale, ctx.mask, dropout)  # [B,H,T,dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * dv))

    def absorbed(self, x: torch.Tensor, ctx: AttnContext, cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The absorbed form over the cache (same result as `forward`): q_lat_h = q_nope_h W_UK_h,
        scores against the cached c_kv plus the rope term, o_h = W_UV_h (softmax . c_kv), then o_proj.
        For decoding: the cache holds earlier tokens or T == 1 (a prefill's causal mask is implicit)."""
        cfg = self.cfg
        B, T, _ = x.shape
        assert ctx.reads_cache or T == 1 or ctx.mask is not None, "absorbed attention needs an explicit mask here"
        H, dn, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_nope, q_pe, c_kv, k_pe = self._project(x, ctx)
        latent = ctx.write(cache[0], 1, torch.cat((c_kv, k_pe), dim=-1))  # [B,S,r+dr]
        w_uk, w_uv = self.kv_b_proj.weight.view(H, dn + dv, r).split([dn, dv], dim=1)  # [H,dn,r], [H,dv,r]
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_uk)  # [B,H,T,r]
        o_lat = latent_attention(q_lat, q_pe.transpose(1, 2), latent, cfg.softmax_scale, ctx.mask)  # [B,H,T,r]
        out = torch.einsum("bhtr,hvr->bthv", o_lat, w_uv)  # [B,T,H,dv]
        return self.o_proj(out.reshape(B, T, H * dv))
