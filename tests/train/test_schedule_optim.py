"""LR schedules against hand-computed values; AdamW parameter groups."""

from __future__ import annotations

import math

import pytest

from latentformer.config import ModelConfig
from latentformer.model.transformer import Transformer
from latentformer.train.config import TrainConfig
from latentformer.train.optim import param_groups
from latentformer.train.schedule import lr_at


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1.0, "min_lr": 0.1, "max_steps": 110, "warmup_steps": 10, **kw})


def test_warmup_is_linear_from_lr_over_warmup():
    c = cfg(schedule="cosine")
    assert [lr_at(c, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_to_floor():
    c = cfg(schedule="cosine")
    # progress p = (step - 10) / 100; lr = 0.1 + 0.45 (1 + cos(pi p))
    assert lr_at(c, 10) == pytest.approx(1.0)
    assert lr_at(c, 35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(c, 60) == pytest.approx(0.55)
    assert lr_at(c, 110) == pytest.approx(0.1)
    assert lr_at(c, 500) == pytest.approx(0.1)


def test_step_decay_at_milestones():
    c = cfg(schedule="step", milestones=[50, 80], gamma=0.5)
    assert [lr_at(c, s) for s in (10, 49, 50, 79, 80, 109)] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_warmup_stable_decay():
    c = cfg(schedule="wsd", decay_fraction=0.2)  # decay over the last 22 steps: 88 .. 110
    assert [lr_at(c, s) for s in (10, 87, 88, 99, 110)] == pytest.approx([1.0, 1.0, 1.0, 1.0 - 0.9 * 11 / 22, 0.1])


def test_constant():
    c = cfg(schedule="constant")
    assert [lr_at(c, s) for s in (9, 10, 1000)] == pytest.approx([1.0, 1.0, 1.0])


def test_time_budget_moves_the_schedule_forward():
    c = cfg(schedule="cosine")
    assert lr_at(c, 20, time_fraction=0.6) == pytest.approx(lr_at(c, 70))  # decay progress 0.6
    assert lr_at(c, 20, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_at(c, 3, time_fraction=0.9) == pytest.approx(0.4)  # warmup counts steps only
    w = cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_at(w, 20, time_fraction=0.9) == pytest.approx(0.55)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="train.schedule"):
        cfg(schedule="linear")


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_on_matrices_only(decay_embeddings):
    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, max_seq_len=16,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                    d_ff=64, tie_embeddings=True, norm="layernorm"))
    decay, no_decay = param_groups(model, TrainConfig(decay_embeddings=decay_embeddings))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied weight once
    assert all(p.dim() >= 2 for p in decay["params"])
    assert not any("norm" in n or n.endswith(".bias") for n in decayed)
    assert ("embed.weight" in decayed) == decay_embeddings
    assert no_decay["weight_decay"] == 0.0


def test_muon_takes_the_hidden_matrices_adamw_the_rest():
    """MLA (q_lora) + MoE with router noise, untied head, learned positions, one MTP module: every
    parameter in exactly one group, and exactly these in Muon: the 2-D hidden matrices, then the
    routed experts' stacks, each group with the shape of the matrices it holds."""
    from latentformer.train.optim import MuonAdamW, build_optimizer

    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, max_seq_len=16, q_lora_rank=16,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, d_ff=64,
                                    n_routed_experts=4, n_shared_experts=1, experts_per_token=2, moe_d_ff=16,
                                    first_k_dense_layers=1, router_noise=True, tie_embeddings=False,
                                    pos_embedding="learned", mtp_depth=1))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1), "cpu")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, gate_up, down, decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g.get("matrix") for g in opt.param_groups] == [None, (16, 32), (32, 16), None, None]
    assert (gate_up, down) == ({"layers.1.ffn.experts.gate_up_proj"}, {"layers.1.ffn.experts.down_proj"})
    attn = ["attn.q_a_proj.weight", "attn.q_b_proj.weight", "attn.kv_a_proj.weight", "attn.kv_b_proj.weight", "attn.o_proj.weight"]
    assert muon == {f"layers.{i}.{n}" for i in (0, 1) for n in attn} | {
        "layers.0.ffn.gate_proj.weight", "layers.0.ffn.up_proj.weight", "layers.0.ffn.down_proj.weight",
        "layers.1.ffn.shared.gate_proj.weight", "layers.1.ffn.shared.up_proj.weight", "layers.1.ffn.shared.down_proj.weight",
        "mtp.0.eh_proj.weight", "mtp.0.block.ffn.gate_proj.weight", "mtp.0.block.ffn.up_proj.weight",
        "mtp.0.block.ffn.down_proj.weight"} | {f"mtp.0.block.{n}" for n in attn}
    assert decay == {"pos_embed.weight", "lm_head.weight", "layers.1.ffn.router.weight", "layers.1.ffn.router.noise_weight"}
    assert no_decay == set(names.values()) - muon - gate_up - down - decay  # norms, the token embedding (decay_embeddings off)
    assert "embed.weight" in no_decay and len(names) == len(muon) + 2 + len(decay) + len(no_decay)
    assert [type(o).__name__ for o in (opt.muon, opt.adamw)] == ["BatchedMuon", "AdamW"]
    assert opt.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.1, 0.1, 0.0]


def test_muon_update_has_the_rms_of_adamw_so_lr_and_decay_carry_over():
    """Moonlight's matching: a Muon step of lr moves a hidden matrix by an update of RMS ~0.2 lr
    (AdamW's typical update RMS), after the decoupled decay p *= 1 - lr wd."""
    import torch

    from latentformer.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, d_model=64, n_heads=2, max_seq_len=16, kv_lora_rank=16,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, d_ff=256))
    lr, wd = 1e-2, 0.1
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=lr, weight_decay=wd), "cpu")
    w = model.layers[0].ffn.up_proj.weight  # [256, 64]
    before = w.detach().clone()
    model(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))).loss.backward()
    opt.step()
    update = (w.detach() - before * (1 - lr * wd)) / lr
    assert update.pow(2).mean().sqrt().item() == pytest.approx(0.2, rel=0.25)  # NS leaves singular values in ~[0.7, 1.2]


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original", None])
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_steps_exactly_as_torchs_muon(nesterov, adjust_lr_fn):
    """BatchedMuon (one Newton-Schulz per shape) against torch.optim.Muon (one per matrix) on
    repeated, tall, wide and square shapes over 4 steps, one matrix without a gradient in the first,
    then a state saved by torch's optimizer loaded into a new BatchedMuon for 2 more: parameters and
    momenta equal bitwise on the CPU."""
    import copy

    import torch

    from latentformer.train.optim import BatchedMuon

    torch.manual_seed(0)
    shapes = [(64, 32), (64, 32), (32, 64), (48, 48), (32, 64), (16, 80), (64, 32)]
    ref = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt_ref, opt_ours = torch.optim.Muon(ref, **hyper), BatchedMuon(ours, ns_dtype=torch.bfloat16, **hyper)
    start = [p.detach().clone() for p in ref]
    for step in range(6):
        if step == 4:
            opt_ours = BatchedMuon(ours, ns_dtype=torch.bfloat16, **hyper)
            opt_ours.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as from a checkpoint: no shared buffers
        for i, (p, q) in enumerate(zip(ref, ours)):
            p.grad = q.grad = None if (step, i) == (0, 3) else torch.randn_like(p)
        opt_ref.step()
        opt_ours.step()
        assert all(torch.equal(p, q) for p, q in zip(ref, ours))
        assert len(opt_ours.state) == len(opt_ref.state) == len(shapes) - (step == 0)
        assert all(torch.equal(opt_ref.state[p]["momentum_buffer"], opt_ours.state[q]["momentum_buffer"])
                   for p, q in zip(ref, ours) if p in opt_ref.state)
    assert not any(torch.equal(p, p0) for p, p0 in zip(ours, start))  # every matrix moved


def test_batched_muon_orthogonalizes_in_fp32_on_the_cpu():
    """By default the CPU runs Newton-Schulz in fp32 (bf16 matmuls are emulated there): one step
    moves each matrix as torch's bf16 step does, to bf16's rounding of the update (relative Frobenius gap)."""
    import torch

    from latentformer.train.optim import BatchedMuon

    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(*s)) for s in [(64, 32), (48, 48), (16, 80)]]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    for p, q in zip(ref, ours):
        p.grad = q.grad = torch.randn_like(p)
    start = [p.detach().clone() for p in ref]
    torch.optim.Muon(ref, lr=0.02, adjust_lr_fn="match_rms_adamw").step()
    opt = BatchedMuon(ours, lr=0.02, adjust_lr_fn="match_rms_adamw")
    opt.step()
    assert opt.ns_dtype is None
    for p, q, p0 in zip(ref, ours, start):
        step_ref, step_ours = p.detach() - p0, q.detach() - p0
        gap = (step_ours - step_ref).norm() / step_ref.norm()
        assert 0 < gap < 0.03, gap  # not bitwise (another dtype) but the same step: measured 1.2-1.5%


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
def test_muon_steps_each_routed_expert_as_its_own_matrices(ffn):
    """A routed-experts layer's 3-D stacks under BatchedMuon == torch.optim.Muon on every expert's
    gate, up and down matrices as separate 2-D parameters (SwiGLU's gate_up_proj holds gate then up
    rows per expert), bitwise on the CPU over 3 steps, beside a plain 2-D matrix."""
    import torch

    from latentformer.model.moe import Experts
    from latentformer.train.optim import BatchedMuon, muon_groups

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, max_seq_len=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=3, experts_per_token=2,
                      moe_d_ff=16, first_k_dense_layers=0, ffn=ffn)
    model = Transformer(cfg)
    groups = muon_groups(model)
    experts = next(m for m in model.modules() if isinstance(m, Experts))
    f = 16
    assert [(m, [p.shape for p in ps]) for m, ps in groups[1:]] == [
        ((f, 32), [experts.gate_up_proj.shape]), ((32, f), [experts.down_proj.shape])]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    ours = BatchedMuon([{"params": ps, **({"matrix": m} if m else {})} for m, ps in groups], ns_dtype=torch.bfloat16, **hyper)
    # the reference: each matrix of the stacks a parameter of its own (in the stacks' row order)
    stacks = [p for _, ps in groups[1:] for p in ps]
    pieces = [[torch.nn.Parameter(m.detach().clone()) for m in p.detach().reshape(-1, *shape)]
              for (shape, _), p in zip(groups[1:], stacks)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in groups[0][1]]
    ref = torch.optim.Muon(plain + [m for ms in pieces for m in ms], **hyper)
    for _ in range(3):
        for p, q in zip(groups[0][1], plain):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for (shape, _), p, ms in zip(groups[1:], stacks, pieces):
            p.grad = torch.randn_like(p)
            for m, g in zip(ms, p.grad.reshape(-1, *shape)):
                m.grad = g.clone()
        ours.step()
        ref.step()
        for (shape, _), p, ms in zip(groups[1:], stacks, pieces):
            assert torch.equal(p.detach().reshape(-1, *shape), torch.stack([m.detach() for m in ms]))
        assert all(torch.equal(p, q) for p, q in zip(groups[0][1], plain))
    assert len(pieces[0]) == 3 * (2 if ffn == "swiglu" else 1)


def _muon_step(scale: float, lr: float, wd: float):
    """A tiny MLA model after one step of Muon at `train.muon_lr_scale` = scale, the lr set as the
    trainer sets it (`set_lr`): (optimizer, {name: (before, after)}, names of Muon's parameters)."""
    import torch

    from latentformer.train.optim import build_optimizer
    from latentformer.train.schedule import set_lr

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, d_model=64, n_heads=2, max_seq_len=16, kv_lora_rank=16,
                                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, d_ff=256))
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1.0, weight_decay=wd, muon_lr_scale=scale), "cpu")
    set_lr(opt, lr)
    muon = {id(p) for p in opt.param_groups[0]["params"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    model(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))).loss.backward()
    opt.step()
    moves = {n: (before[n], p.detach()) for n, p in model.named_parameters()}
    return opt, moves, {n for n, p in model.named_parameters() if id(p) in muon}


def test_muon_lr_scale_scales_muon_steps_only():
    """`train.muon_lr_scale` k: each Muon matrix moves by k times the update (and k times the decay) of
    k = 1; the AdamW parameters move exactly as with k = 1; the groups get the schedule's lr times
    their scale."""
    import torch

    lr, wd, k = 1e-2, 0.1, 3.0
    _, base, muon = _muon_step(1.0, lr, wd)
    opt, scaled, _ = _muon_step(k, lr, wd)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([k * lr, lr, lr])
    assert muon and set(base) - muon
    for name, (b0, b1) in base.items():
        s0, s1 = scaled[name]
        assert torch.equal(b0, s0)
        if name in muon:
            step_1 = (b1 - b0 * (1 - lr * wd)) / lr
            step_k = (s1 - s0 * (1 - k * lr * wd)) / (k * lr)
            torch.testing.assert_close(step_k, step_1, atol=1e-6, rtol=1e-4)
        else:
            assert torch.equal(b1, s1), name


def test_muon_lr_scale_is_the_runs_own_after_a_resume():
    """Loading an optimizer state saved at another `muon_lr_scale` keeps this run's scale."""
    from latentformer.train.schedule import set_lr

    saved, _, _ = _muon_step(3.0, 1e-2, 0.1)
    opt, _, _ = _muon_step(2.0, 1e-2, 0.1)
    opt.load_state_dict(saved.state_dict())
    set_lr(opt, 1e-2)
    assert [g.get("lr_scale") for g in opt.param_groups] == [2.0, None, None]
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-2)


def test_bad_optimizer_names_the_field():
    with pytest.raises(ValueError, match="train.optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="train.muon_momentum"):
        TrainConfig(muon_momentum=1.0)
    with pytest.raises(ValueError, match="train.muon_lr_scale"):
        TrainConfig(muon_lr_scale=0.0)
