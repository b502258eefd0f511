"""The decoder-only Transformer: blocks, initialization, accounting, incremental forward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from latentformer.config import ModelConfig
from latentformer.model.attention import AttnContext, RowContext, attention_module
from latentformer.model.cache import KVCache
from latentformer.model.ffn import make_ffn
from latentformer.model.loss import linear_cross_entropy, linear_kl_divergence
from latentformer.model.moe import MoE
from latentformer.model.norm import RMSNorm, make_norm
from latentformer.model.rope import LearnedPositions, RotaryEmbedding, ScaledSinusoidPositions, rope_inv_freq, sinusoid_inv_freq

IGNORE_INDEX = -100


class ModelOutput(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over targets != IGNORE_INDEX
    aux_loss: torch.Tensor | None  # MoE balance loss (already times its coefficient), or None
    # multi-token prediction: 1/D sum_k of module k's mean cross-entropy (training mode with
    # mtp_depth D > 0), or None; the trainer adds it times train.mtp_weight
    mtp_loss: torch.Tensor | None = None
    # distillation (a `teacher` given to forward): mean KL(teacher || model) of the next-token
    # distributions over the same targets, or None; the trainer mixes it in by train.distill_weight
    distill_loss: torch.Tensor | None = None

    def objective(self, mtp_weight: float, distill_weight: float = 0.0) -> torch.Tensor:
        """What training minimizes: loss + aux_loss + mtp_weight * mtp_loss (DeepSeek-V3 eq. 25), the
        loss being (1 - distill_weight) * loss + distill_weight * distill_loss when distilling."""
        main = self.loss if self.distill_loss is None else (1 - distill_weight) * self.loss + distill_weight * self.distill_loss
        total = main if self.aux_loss is None else main + self.aux_loss
        return total if self.mtp_loss is None else total + mtp_weight * self.mtp_loss


class Block(nn.Module):
    """Pre-norm: x + f(norm(x)); post-norm (original Transformer): norm(x + f(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = attention_module(cfg)(cfg)
        self.ffn_norm = make_norm(cfg, cfg.d_model)
        self.ffn = MoE(cfg) if cfg.layer_is_moe(layer) else make_ffn(cfg, cfg.d_ff)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx: AttnContext, cache: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        return self.compose(x, lambda h: self.attn(h, ctx, cache), self.ffn)

    def compose(self, x: torch.Tensor, attn: Callable[[torch.Tensor], torch.Tensor],
                ffn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around its two sublayers `attn` and `ffn` ([B,T,d] -> [B,T,d] each); the decode
        layer passes its own implementations of this block's attention and FFN (same math)."""
        if self.cfg.norm_placement == "pre":
            x = x + self.dropout(attn(self.attn_norm(x)))
            return x + self.dropout(ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(attn(x)))
        return self.ffn_norm(x + self.dropout(ffn(x)))


class MTPModule(nn.Module):
    """Multi-token prediction module k (DeepSeek-V3 §2.2), over positions i = 0..T-k-1:
        h'_i = eh_proj([hidden_norm(h^{k-1}_i); embed_norm(Emb(t_{i+k}))])   # 2d -> d
        h^k = Block(h')                    # causal over the shortened sequence
        logits of t_{i+k+1} = lm_head(norm(h^k_i))
    The embedding and the output layer are the main model's; each module has its own norms (V3's
    enorm, hnorm, shared_head.norm). The block is dense (d_ff) even in an MoE model: NOTES.md, "Model"."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.hidden_norm = make_norm(cfg, cfg.d_model)
        self.embed_norm = make_norm(cfg, cfg.d_model)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg.replace(n_routed_experts=0), layer)
        self.norm = make_norm(cfg, cfg.d_model) if cfg.final_norm else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """h [B, T', d] (the previous depth's output), emb [B, T', d] (embeddings of the tokens k
        ahead) -> this depth's output h^k [B, T', d]."""
        return self.block(self.eh_proj(torch.cat([self.hidden_norm(h), self.embed_norm(emb)], dim=-1)), ctx)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) if self.norm is not None else h


class Transformer(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab]; with `targets` -> ModelOutput(loss, aux_loss, mtp_loss).

    With `cache` (from `make_cache`) the forward is incremental: the new tokens are written at
    the cache's position and the logits of the new tokens only are returned.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = {"learned": LearnedPositions, "sinusoid": ScaledSinusoidPositions}.get(cfg.pos_embedding)
        self.pos_embed = self.pos_embed(cfg) if self.pos_embed else None
        self.rope = RotaryEmbedding(cfg) if cfg.rope else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.fp8_output = False  # the loss's output-layer matmuls in float8 (train.fp8_output, model/loss.py)
        # built on the meta device (no random draws) and registered last: reset_parameters gives the
        # main parameters the same initial values with or without MTP, then initializes the modules
        self.mtp = None
        if cfg.mtp_depth:
            with torch.device("meta"):
                mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.mtp_depth))
            self.mtp = mtp.to_empty(device=self.embed.weight.device)
        self.reset_parameters()

    # -- init ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) for matrices and embeddings, residual output projections
        scaled by 1/sqrt(2 n_layers) (Radford et al. 2019), norms at 1, additive positions small."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] + "." + name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                is_residual = leaf in ("o_proj.weight", "down_proj.weight", "experts.down_proj")
                nn.init.normal_(p, 0.0, residual_std if is_residual else std)
            elif name.endswith("noise_weight"):
                nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, ScaledSinusoidPositions):
                nn.init.ones_(m.scale)
                nn.init.zeros_(m.shift)
            elif isinstance(m, MoE):
                m.router.bias.zero_()

    @torch.no_grad()
    def init_derived_buffers(self) -> None:
        """Recompute the non-persistent buffers (rope and sinusoid frequencies, MoE load counters)
        on the parameters' device. For a model built on the meta device whose weights were then
        loaded with `load_state_dict(..., assign=True)`: no random init of large models."""
        cfg = self.config
        with torch.device(self.embed.weight.device):
            if self.rope is not None:
                self.rope.inv_freq = rope_inv_freq(cfg)[0]
            if isinstance(self.pos_embed, ScaledSinusoidPositions):
                self.pos_embed.inv_freq = sinusoid_inv_freq(cfg.d_model)
            for moe in self.moe_layers():
                moe.load_since_update = torch.zeros(cfg.n_routed_experts)
        assert not any(b.is_meta for b in self.buffers()), "a derived buffer was left on the meta device"

    # -- forward ---------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
                loss_grad: bool = True) -> torch.Tensor | ModelOutput:
        """tokens [B, T] -> logits [B, T, vocab] (with `cache`: of the new tokens only).

        With `targets` [B, T] (training): ModelOutput(loss, aux_loss, mtp_loss, distill_loss); the
        MTP modules run in training mode only (an evaluation scores the next-token head). The output
        layer is fused into the loss (`linear_cross_entropy`): no [B, T, vocab] tensor is materialized.
        `teacher` = (another model's `final_hidden` of the same tokens [B, T, d_t], its output weight
        [vocab, d_t]) adds distill_loss, the KL from its next-token distributions (`linear_kl_divergence`).
        `loss_grad=False` computes the cross-entropy as a monitor, without its gradient: a step that
        trains on the KL alone (distill_weight 1) saves the output layer's two gradient matmuls."""
        self.check_input(tokens, cache)
        if self.training and self.config.token_dropout > 0:
            if teacher is not None:
                raise ValueError("distillation needs the teacher's and the model's tokens to be the same: "
                                 "model.token_dropout must be 0")
            tokens, targets = self._drop_tokens(tokens, targets)
        x = self._blocks(tokens, cache)
        if targets is None:
            return self.head(x)
        h, flat_targets = self._final_norm(x).flatten(0, 1), targets.reshape(-1)
        ce_inputs = (h, self.lm_head.weight) if loss_grad else (h.detach(), self.lm_head.weight.detach())
        loss = linear_cross_entropy(*ce_inputs, flat_targets, IGNORE_INDEX, fp8=self.fp8_output)
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        mtp = self._mtp_loss(x, tokens, targets) if self.mtp is not None and self.training else None
        distill = None
        if teacher is not None:
            distill = linear_kl_divergence(h, self.lm_head.weight, teacher[0].flatten(0, 1), teacher[1], flat_targets, IGNORE_INDEX)
        return ModelOutput(loss, torch.stack(aux).sum() if aux else None, mtp, distill)

    def final_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> the final norm's output [B, T, d], what the output layer reads: a
        teacher's half of `forward(..., teacher=(final_hidden, lm_head.weight))`."""
        self.check_input(tokens, None)
        return self._final_norm(self._blocks(tokens, None))

    def mtp_hidden(self, x: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The MTP modules' outputs h^k [B, T-k, d], k = 1..D, from the last block's output x
        [B, T, d]: module k at position i sees tokens <= i+k and predicts token i+k+1."""
        T, out, h = tokens.shape[1], [], x
        if T <= len(self.mtp):
            raise ValueError(f"multi-token prediction of depth {len(self.mtp)} needs more than {len(self.mtp)} tokens, got {T}")
        for k, module in enumerate(self.mtp, start=1):
            emb, ctx = self.context(tokens[:, k:], None)  # Emb(t_{i+k}) at positions i = 0..T-k-1
            h = module(h[:, :T - k], emb, ctx)
            out.append(h)
        return out

    def _mtp_loss(self, x: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """1/D sum_k CE(module k's logits at i, token i+k+1 = targets[:, i+k])."""
        losses = [linear_cross_entropy(module.final_norm(h).flatten(0, 1), self.lm_head.weight,
                                       targets[:, k:].reshape(-1), IGNORE_INDEX, fp8=self.fp8_output)
                  for k, (module, h) in enumerate(zip(self.mtp, self.mtp_hidden(x, tokens)), start=1)]
        return torch.stack(losses).mean()

    def next_token_logits(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, vocab] after the last of `tokens` [B, T]: the output layer runs on the last
        position only, so a prompt prefill never materializes [B, T, vocab]."""
        self.check_input(tokens, cache)
        return self.head(self._blocks(tokens, cache)[:, -1])

    def _blocks(self, tokens: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """tokens [B, T] -> the last block's output [B, T, d]; advances the cache."""
        x, ctx = self.context(tokens, cache)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(tokens.shape[1])
        return x

    # Pieces of the forward that the decode layer (latentformer.infer.decode) composes too.

    def check_input(self, tokens: torch.Tensor, cache: KVCache | None) -> None:
        """tokens [B, T] must fit the cache (or the model's context without one)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {list(tokens.shape)}")
        B, T = tokens.shape
        end = (cache.pos if cache is not None else 0) + T
        limit = cache.max_seq_len if cache is not None else self.config.max_seq_len
        if end > limit:
            raise ValueError(f"sequence of {end} tokens exceeds the {'cache' if cache is not None else 'model'} limit of {limit}")
        if cache is not None and B != cache.batch_size:
            raise ValueError(f"batch of {B} does not match the cache's batch size {cache.batch_size}")

    def context(self, tokens: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, AttnContext]:
        """Embedded inputs [B,T,d] and the layers' context for `tokens` [B,T] written at the cache's
        position (0 without a cache): the mask is causal over slots 0..pos+T-1, minus left padding.
        A ragged cache: each row at its own length (`row_context`), attention over pos+T slots."""
        T = tokens.shape[1]
        if cache is not None and cache.ragged:
            return self.row_context(tokens, cache, cache.pos + T)
        start = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else None
        slots = torch.arange(start, start + T, device=tokens.device)  # [T]
        x, cos, sin = self.inputs(tokens, slots[None], pad)
        if pad is None and (start == 0 or T == 1):  # SDPA's causal flag (or no mask at all) suffices
            return x, AttnContext(cos, sin, start, None, pad)
        return x, AttnContext(cos, sin, start, self.attention_mask(slots, start + T, pad), pad)

    def row_context(self, tokens: torch.Tensor, cache: KVCache, span: int | None) -> tuple[torch.Tensor, RowContext]:
        """As `context`, with each row's new tokens at its own `cache.length[b]` (device-side
        addressing: no host value but `span`, the slots attention reads; None = all of them)."""
        slots = cache.length[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, T]
        x, cos, sin = self.inputs(tokens, slots, cache.pad)
        mask = self.attention_mask(slots, span or cache.max_seq_len, cache.pad)
        return x, RowContext(cos, sin, cache.pos, mask, cache.pad, slots=slots, span=span)

    def inputs(self, tokens: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token (+ position) embeddings [B,T,d] and rope angles for tokens in cache `slots` [B|1, T]:
        row b's token in slot s has position s - pad[b]."""
        positions = slots if pad is None else (slots - pad[:, None]).clamp(min=0)  # [B|1, T]
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions).to(x.dtype)
        x = self.dropout(x)
        cos, sin = self.rope(positions) if self.rope is not None else (None, None)
        return x, cos, sin

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer: [B,T,d] -> logits [B,T,vocab]."""
        return self.lm_head(self._final_norm(x))

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x

    @staticmethod
    def attention_mask(slots: torch.Tensor, S: int, pad: torch.Tensor | None) -> torch.Tensor:
        """Boolean attention mask [B|1, 1, T, S] (True = may attend) for queries in cache `slots`
        ([T], or [B, T] per row) over keys 0..S-1: causal, and padding slots are never keys except a
        padding query's own slot (which keeps its softmax finite)."""
        k_slot = torch.arange(S, device=slots.device)  # [S]
        q_slot = (slots if slots.dim() == 2 else slots[None])[:, None, :, None]  # [B|1, 1, T, 1]
        mask = k_slot <= q_slot  # [B|1, 1, T, S]
        if pad is not None:
            mask = mask & ((k_slot >= pad[:, None, None, None]) | (k_slot == q_slot))
        return mask

    def _drop_tokens(self, tokens: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input-token dropout: replace a random p of the inputs by random tokens; their
        positions are excluded from the loss."""
        drop = torch.rand(tokens.shape, device=tokens.device) < self.config.token_dropout
        tokens = torch.where(drop, torch.randint_like(tokens, self.config.vocab_size), tokens)
        if targets is not None:
            targets = targets.masked_fill(drop, IGNORE_INDEX)
        return tokens, targets

    # -- caches ----------------------------------------------------------------------------
    def make_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """Preallocate a cache for `batch_size` rows of up to `max_seq_len` tokens (default: the model's)."""
        max_seq_len = max_seq_len or self.config.max_seq_len
        if not 0 < max_seq_len <= self.config.max_seq_len:
            raise ValueError(f"max_seq_len must be in [1, {self.config.max_seq_len}], got {max_seq_len}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        weight = self.embed.weight
        dtype = dtype or weight.dtype
        layers = [blk.attn.make_cache(batch_size, max_seq_len, dtype, weight.device) for blk in self.layers]
        return KVCache(layers, batch_size, max_seq_len)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Cache bytes per token over all layers: each layer's `cache_values_per_token` (MLA r + dr,
        MHA-family 2 Hk D) times the itemsize of `dtype` (default: the weights')."""
        itemsize = (dtype or self.embed.weight.dtype).itemsize
        return sum(blk.attn.cache_values_per_token(self.config) for blk in self.layers) * itemsize

    # -- accounting ------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [blk.ffn for blk in self.layers if isinstance(blk.ffn, MoE)]

    def num_params(self, active: bool = False) -> int:
        """Parameters (tied weights counted once). `active=True`: those one token uses
        (MoE: shared experts + experts_per_token routed experts instead of all)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            cfg = self.config
            for moe in self.moe_layers():
                per_expert = sum(p[0].numel() for p in moe.experts.parameters())
                total -= (cfg.n_routed_experts - cfg.experts_per_token) * per_expert
                if moe.router.noise_weight is not None:
                    total -= moe.router.noise_weight.numel()  # used in training only
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), the PaLM convention (Chowdhery et al. 2022, App. B):
        6 * N_matmul + 6 * L * H * (d_qk + d_v) * T, with N_matmul the active parameters that enter a
        matmul (all but token/position embedding tables; the output layer counts even when tied) and
        T = seq_len (default max_seq_len), attention counted over all T keys as in PaLM/nanoGPT.
        With D MTP modules: their parameters are in N_matmul, the output layer counts D more times
        and L is n_layers + D (each module's shorter sequence counted as T)."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        n = self.num_params(active=True) - sum(p.numel() for p in self.parameters() if p.dim() < 2)
        n -= self.embed.weight.numel() * (not cfg.tie_embeddings)
        if self.pos_embed is not None and isinstance(self.pos_embed, LearnedPositions):
            n -= self.pos_embed.weight.numel()
        n += cfg.mtp_depth * self.lm_head.weight.numel()
        return 6.0 * n + 6.0 * (cfg.n_layers + cfg.mtp_depth) * cfg.n_heads * (cfg.qk_head_dim + cfg.v_dim) * T

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Run the auxiliary-loss-free balancing update on every MoE layer (call after each optimizer step)."""
        if self.config.router_bias_update_rate > 0:
            for moe in self.moe_layers():
                moe.update_bias()
