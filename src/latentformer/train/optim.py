"""The optimizers: AdamW, or Muon on the hidden matrices with AdamW on the rest (`train.optimizer`).

AdamW decays weight matrices only: norm gains, biases and (unless `train.decay_embeddings`)
embedding tables are excluded; decaying them pulls scales toward zero without regularizing
anything useful (Loshchilov & Hutter 2019; the nanoGPT/GPT-3 convention).

Muon (Jordan et al. 2024; `torch.optim.Muon`'s update) orthogonalizes the momentum of each weight
matrix of the hidden layers: attention and dense/shared-expert FFN projections, the MTP modules'
projections and blocks, and each routed expert's gate, up and down matrices (Moonlight's choice;
stored as 3-D stacks, `muon_groups`). Embeddings, the output layer, norms, biases and MoE routers stay
on AdamW. With Moonlight's update-RMS matching (Liu et al. 2025, "Muon is Scalable for LLM Training":
adjust_lr_fn="match_rms_adamw", lr x 0.2 sqrt(max(A, B)) for an A x B matrix) the update has AdamW's
RMS, so one `train.lr` and `train.weight_decay` serve both optimizers; `train.muon_lr_scale` multiplies
Muon's lr (its groups carry `lr_scale`, which `schedule.set_lr` applies every step; the decoupled
weight decay, lr x weight_decay, scales with it).

`BatchedMuon` is torch's Muon with the same update, state and groups, stepped a shape at a time: the
momentum of all matrices in one foreach pass, then one Newton-Schulz over the stack of each shape's
matrices (batched matmuls) instead of one per matrix. A model has a handful of shapes (mla-125m: 84
matrices, 6 shapes), so the step launches a handful of small kernels where torch's launches ~25 per
matrix.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from latentformer.model.moe import Experts, Router
from latentformer.train.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig, exclude: set[int] = frozenset()) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and everything else (not decayed), over the parameters
    not in `exclude` (ids). Tied weights appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields shared tensors once
        if not p.requires_grad or id(p) in exclude:
            continue
        is_matrix = p.dim() >= 2 and (cfg.decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_groups(model: nn.Module) -> list[tuple[tuple[int, int] | None, list[nn.Parameter]]]:
    """The parameters Muon updates, as (matrix shape, parameters) groups: first (None, the 2-D
    matrices of the hidden layers: `model.layers` and the MTP modules, MoE routers excepted, as a
    router is a classifier over experts, not a hidden map), then one group per shape of the routed
    experts' 3-D tensors, each a stack of matrices of that shape: `down_proj` [E, d, f] holds E
    [d, f] matrices, SwiGLU's `gate_up_proj` [E, 2f, d] 2E [f, d] ones (each expert's gate and up
    apart, as a dense FFN's gate_proj and up_proj; Moonlight orthogonalizes each expert's)."""
    routers = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    hidden = [model.layers, *([model.mtp] if getattr(model, "mtp", None) is not None else [])]
    matrices = [p for part in hidden for p in part.parameters()
                if p.requires_grad and p.dim() == 2 and id(p) not in routers]
    stacks = defaultdict(list)
    for experts in (m for part in hidden for m in part.modules() if isinstance(m, Experts)):
        gate_up, down = experts.gate_up_proj, experts.down_proj
        for p, rows in ((gate_up, gate_up.shape[1] // (2 if experts.swiglu else 1)), (down, down.shape[1])):
            if p.requires_grad:
                stacks[rows, p.shape[2]].append(p)
    return [(None, matrices), *stacks.items()]


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (Jordan et al. 2024) on a stack of matrices at once.
    update: [B, m, n] -> [B, m, n] in `dtype`, each matrix's singular values pushed to ~[0.7, 1.2]; per
    matrix, in bf16 the same arithmetic as `torch.optim.Muon` (the wide orientation, Frobenius-normalized)."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """`torch.optim.Muon`'s per-shape lr: Keller Jordan's sqrt(max(1, A/B)) or Moonlight's RMS match 0.2 sqrt(max(A, B))."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def closure_loss(closure) -> torch.Tensor | None:
    """An optimizer step's `closure` run with gradients on (it recomputes the loss), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2 shards dim 0: whole experts of a routed-expert tensor), else `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


class BatchedMuon(torch.optim.Muon):
    """`torch.optim.Muon`, stepped a shape at a time (module doc): same hyperparameters, state
    (`momentum_buffer`) and checkpoints. A group with a `matrix` key (rows, cols) holds 3-D tensors,
    each a stack of matrices of that shape (the routed experts: `muon_groups`); such groups come
    after the plain ones, which torch's constructor checks to be 2-D. Under FSDP2 a 2-D matrix is
    sharded: plain groups of DTensors take torch's own step, which orthogonalizes the global matrix
    one at a time; an expert stack is sharded between whole experts, so each rank steps its own.

    `ns_dtype`: the Newton-Schulz dtype; by default bf16 on GPUs, as torch's, and fp32 elsewhere: a CPU
    without bf16 matrix units emulates bf16 matmuls (22x slower than fp32 on the development CPU)."""

    def __init__(self, params: Iterable, ns_dtype: torch.dtype | None = None, **hyper) -> None:
        self.ns_dtype = ns_dtype
        groups = list(params)
        if groups and not isinstance(groups[0], dict):  # a plain iterable of 2-D parameters, as torch takes
            groups = [{"params": groups}]
        super().__init__([g for g in groups if "matrix" not in g], **hyper)
        for group in groups:
            if "matrix" in group:
                self.add_param_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        sharded = [g for g in self.param_groups if "matrix" not in g and any(isinstance(p, DTensor) for p in g["params"])]
        if sharded:
            every, self.param_groups = self.param_groups, sharded
            try:
                super().step()
            finally:
                self.param_groups = every
        for group in self.param_groups:
            if not any(group is g for g in sharded):
                self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        local = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        bufs = [_local(self.state[p]["momentum_buffer"]) for p in params]
        momentum, lr = group["momentum"], group["lr"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        buckets = defaultdict(list)  # one Newton-Schulz per (matrix shape, dtype, device)
        for i, p in enumerate(local):
            buckets[tuple(group.get("matrix", p.shape)), p.dtype, p.device].append(i)
        for (shape, dtype, device), index in buckets.items():
            same = [local[i] for i in index]
            ns_dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
            ortho = orthogonalize(torch.cat([updates[i].reshape(-1, *shape) for i in index]), group["ns_coefficients"],
                                  group["ns_steps"], group["eps"], ns_dtype).to(dtype)
            ortho = [o.view_as(p) for o, p in zip(ortho.split([p.numel() // math.prod(shape) for p in same]), same)]
            torch._foreach_mul_(same, 1 - lr * group["weight_decay"])
            torch._foreach_add_(same, ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], shape))


class MuonAdamW(torch.optim.Optimizer):
    """`BatchedMuon` over `muon_groups` and `torch.optim.AdamW` over `adamw_groups` as ONE
    optimizer: one `param_groups` list (the schedule sets every group's lr; GradScaler, LambdaLR and
    the distributed checkpoint's optimizer state dict see one object) and one `state`, which the two
    inner optimizers share, so `state_dict()` / `load_state_dict()` save and restore both exactly."""

    def __init__(self, muon_groups: Iterable[dict], adamw_groups: Iterable[dict], *, muon: dict, adamw: dict) -> None:
        self.muon = BatchedMuon(list(muon_groups), **muon)
        self.adamw = torch.optim.AdamW(list(adamw_groups), **adamw)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (again after a load replaced them)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved state and groups, each group's `lr_scale` kept as this run configures it."""
        scales = [group.get("lr_scale") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, scale in zip(self.param_groups, scales):
            if scale is not None:
                group["lr_scale"] = scale
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both; `closure` (Lightning passes one) recomputes the loss first, as in torch's optimizers."""
        loss = closure_loss(closure)
        self.muon.step()
        self.adamw.step()
        return loss


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """`train.optimizer`: AdamW, the fused CUDA kernel when the parameters live on a GPU (one
    launch per step); or MuonAdamW (module doc)."""
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device_type == "cuda")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg), **adamw)
    scale = cfg.muon_lr_scale
    muon = [{"params": params, "weight_decay": cfg.weight_decay, "lr": scale * cfg.lr, "lr_scale": scale,
             **({"matrix": matrix} if matrix else {})} for matrix, params in muon_groups(model)]
    return MuonAdamW(muon, param_groups(model, cfg, exclude={id(p) for g in muon for p in g["params"]}),
                     muon=dict(lr=cfg.lr, momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"), adamw=adamw)
