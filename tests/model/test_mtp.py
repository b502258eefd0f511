"""Multi-token prediction (DeepSeek-V3 §2.2): module k at position i sees tokens <= i+k and is
scored on token i+k+1; depth 0 is the model as before; inference ignores the modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentformer.model.transformer import Transformer

from .helpers import small

MLA = dict(attention="mla", kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)


def model(depth: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small(**MLA, mtp_depth=depth, **kw))


def test_mtp_loss_is_scored_on_the_tokens_k_plus_one_ahead():
    m = model(2).train()
    B, T = 2, 12
    seq = torch.randint(0, 97, (B, T + 1))
    x, y = seq[:, :-1], seq[:, 1:]
    out = m(x, y)
    h0 = m._blocks(x, None)
    hidden = m.mtp_hidden(h0, x)
    assert [h.shape[1] for h in hidden] == [T - 1, T - 2]
    # by hand, module 1: position i joins h0_i with the embedding of token i+1
    mod = m.mtp[0]
    emb = torch.stack([m.embed(seq[:, i + 1]) for i in range(T - 1)], dim=1)
    _, ctx = m.context(seq[:, :T - 1], None)  # positions 0..T-2
    h1 = mod.block(mod.eh_proj(torch.cat([mod.hidden_norm(h0[:, :T - 1]), mod.embed_norm(emb)], -1)), ctx)
    torch.testing.assert_close(hidden[0], h1)
    # the loss: module k's logits at i against token i+k+1 of the sequence
    losses = []
    for k, (mod, h) in enumerate(zip(m.mtp, hidden), start=1):
        logits = m.lm_head(mod.final_norm(h))  # [B, T-k, V]
        target = torch.stack([seq[:, i + k + 1] for i in range(T - k)], dim=1)
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten()))
    torch.testing.assert_close(out.mtp_loss, torch.stack(losses).mean())
    torch.testing.assert_close(out.objective(0.3), out.loss + 0.3 * out.mtp_loss)


def test_mtp_modules_are_causal():
    m = model(2).eval()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        base = m.mtp_hidden(m._blocks(x, None), x)
        for t in (4, 7):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % 97
            other = m.mtp_hidden(m._blocks(changed, None), changed)
            for k, (a, b) in enumerate(zip(base, other), start=1):
                # module k at position i reads tokens <= i+k: positions < t-k are unchanged, t-k is not
                torch.testing.assert_close(a[:, :t - k], b[:, :t - k], rtol=0, atol=0)
                assert not torch.allclose(a[:, t - k], b[:, t - k])


def test_depth_zero_is_the_model_as_before_and_inference_ignores_the_modules():
    plain, mtp = model(0), model(2)
    assert plain.mtp is None and not any(k.startswith("mtp.") for k in plain.state_dict())
    main = {k: v for k, v in mtp.state_dict().items() if not k.startswith("mtp.")}
    assert main.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in main.items())  # same initial values
    x = torch.randint(0, 97, (2, 10))
    assert torch.equal(plain(x), mtp(x))  # forward without targets: the next-token head only
    plain.train(), mtp.train()
    a, b = plain(x, x), mtp(x, x)
    assert a.mtp_loss is None and torch.equal(a.loss, b.loss) and torch.equal(a.objective(0.3), a.loss)
    assert mtp.eval()(x, x).mtp_loss is None  # evaluation scores the next-token head only
    # a trained MTP checkpoint's main weights serve a model without the modules
    with torch.no_grad():
        for p in mtp.parameters():
            p.add_(0.01 * torch.randn_like(p))
    served = Transformer(plain.config)
    served.load_state_dict({k: v for k, v in mtp.state_dict().items() if not k.startswith("mtp.")})
    assert torch.equal(served.eval()(x), mtp.eval()(x))


def test_hf_export_drops_the_modules():
    from latentformer.interop.hf import to_hf_state

    plain, mtp = model(0), model(1)
    a, b = to_hf_state(plain), to_hf_state(mtp)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_moe_model_gets_a_dense_mtp_block_and_bad_depth_names_the_field():
    m = model(1, n_routed_experts=4, experts_per_token=2, moe_d_ff=16)
    assert len(m.moe_layers()) == 2 and not hasattr(m.mtp[0].block.ffn, "router")
    with pytest.raises(ValueError, match="mtp_depth"):
        small(**MLA, mtp_depth=-1)
