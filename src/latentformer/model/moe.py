"""Mixture-of-Experts feed-forward (DeepSeekMoE: Dai et al. 2024; DeepSeek-V2/V3).

Routing per token x (d_model), E routed experts, top-k:
  s = softmax(W_g x) or sigmoid(W_g x)          # scores [N, E], fp32
  (training, router_noise) logits += N(0,1) * softplus(W_noise x)  # noisy top-k (Shazeer et al. 2017)
  choice = s + b                                # b: balancing bias, selection only (V3 §2.1.2)
  group-limited: keep the `topk_groups` best of `n_expert_groups` groups
      (group score: max for softmax as in V2, sum of top-2 for sigmoid as in V3)
  idx = topk(choice, k); w = s[idx]; w /= sum(w) if norm_topk_prob; w *= routed_scaling_factor
  y = sum_k w_k * Expert_{idx_k}(x) + sum_shared Expert_shared(x)
Capacity (capacity_factor > 0): each expert takes at most ceil(cf * N * k / E) assignments, in
token order; the rest are dropped (the token keeps its residual and shared experts).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from latentformer.config import ModelConfig
from latentformer.model.ffn import make_ffn


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.d_model))
        self.noise_weight = nn.Parameter(torch.zeros(E, cfg.d_model)) if cfg.router_noise else None
        # learned state of the auxiliary-loss-free balancer: saved with the weights
        self.register_buffer("bias", torch.zeros(E), persistent=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, d] -> (weights [N, k] fp32, expert ids [N, k], scores [N, E] fp32)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(x.float(), self.noise_weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        scores = logits.softmax(-1) if cfg.router_scoring == "softmax" else logits.sigmoid()
        choice = scores.detach() + self.bias
        if cfg.n_expert_groups > 1:
            G = cfg.n_expert_groups
            grouped = choice.view(choice.shape[0], G, -1)
            if cfg.router_scoring == "sigmoid":
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            keep = group_scores.topk(cfg.topk_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask[:, :, None].expand_as(grouped).reshape_as(choice), float("-inf"))
        idx = choice.topk(cfg.experts_per_token, dim=-1).indices
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx, scores


class Experts(nn.Module):
    """E expert FFNs stored as 3-D weights (the transformers DeepseekV3 layout):
    gate_up_proj [E, 2*f, d] (SwiGLU: gate rows then up rows; GELU: [E, f, d]), down_proj [E, d, f]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff
        self.swiglu = cfg.ffn == "swiglu"
        self.gate_up_proj = nn.Parameter(torch.empty(E, (2 if self.swiglu else 1) * f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h, approximate="tanh")

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, d] sorted by expert, counts [E] rows per expert -> [M, d]."""
        dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
        if x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
            # one grouped GEMM per projection (Hopper+), no host sync; offsets = cumulative row counts
            offs = counts.cumsum(0).to(torch.int32)
            w1, w2 = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
            h = torch._grouped_mm(x.to(dtype), w1.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(self._act(h), w2.transpose(-2, -1), offs=offs)
        # portable path: one GEMM per expert over its contiguous slice of rows
        outs = []
        for e, xe in enumerate(torch.split(x, counts.tolist())):
            if xe.shape[0]:
                outs.append(F.linear(self._act(F.linear(xe, self.gate_up_proj[e])), self.down_proj[e]))
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


class MoE(nn.Module):
    """x [B, T, d] -> [B, T, d]; after each forward: `aux_loss` (scalar or None),
    `load` [E] assignments per expert, `dropped` (number of dropped assignments)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared = make_ffn(cfg, cfg.moe_d_ff * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None
        # assignments per expert since the last bias update (derived, not checkpointed)
        self.register_buffer("load_since_update", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.load: torch.Tensor | None = None
        self.dropped: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, d = x.shape
        E, k = cfg.n_routed_experts, cfg.experts_per_token
        xf = x.reshape(B * T, d)
        N = xf.shape[0]
        weights, idx, scores = self.router(xf)

        flat_expert = idx.reshape(-1)  # [N*k], assignment a belongs to token a // k
        order = torch.argsort(flat_expert, stable=True)  # grouped by expert, token order kept
        # (scatter_add rather than bincount: a static output shape, so the step compiles as one graph)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
        sorted_expert = flat_expert[order]
        if cfg.capacity_factor > 0:
            capacity = math.ceil(cfg.capacity_factor * N * k / E)
            starts = counts.cumsum(0) - counts
            rank_in_expert = torch.arange(N * k, device=x.device) - starts[sorted_expert]
            keep = rank_in_expert < capacity
            order, sorted_expert = order[keep], sorted_expert[keep]
            kept_counts = counts.clamp(max=capacity)
        else:
            kept_counts = counts
        token = order // k
        y = self.experts(xf[token], kept_counts)
        w = weights.reshape(-1)[order].to(y.dtype)
        out = torch.zeros_like(xf).index_add_(0, token, (y * w[:, None]).to(xf.dtype))
        if self.shared is not None:
            out = out + self.shared(xf)

        self.load = counts.detach()
        self.dropped = (counts - kept_counts).sum().detach()
        if self.training and cfg.router_bias_update_rate > 0:
            self.load_since_update += counts.detach().float()
        self.aux_loss = None
        if self.training and cfg.aux_loss_coef > 0:
            # Switch/DeepSeek balance loss: E/(N k) * sum_i count_i * mean_t p_{t,i}
            probs = scores / scores.sum(-1, keepdim=True)
            frac = counts.float() * E / (N * k)
            self.aux_loss = cfg.aux_loss_coef * (frac * probs.mean(0)).sum()
        return out.reshape(B, T, d)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i), then reset the count.
        Loads are summed over ranks first so every replica applies the same update."""
        load = self.load_since_update
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self.router.bias += self.cfg.router_bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()
