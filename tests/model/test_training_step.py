"""One optimizer step: every parameter receives a gradient; targets are never wrapped."""

import pytest
import torch

from latentformer import Transformer
from latentformer.model.transformer import IGNORE_INDEX

from .helpers import grid, small

CASES = dict(grid())


@pytest.mark.parametrize("name", [n for n in CASES if n.endswith("moe") or n.startswith("mla|")])
def test_every_parameter_gets_a_gradient(name):
    cfg = small(**CASES[name], router_noise="moe" in name, aux_loss_coef=0.01 if "moe" in name else 0.0)
    model = Transformer(cfg).train()
    x = torch.randint(0, 97, (4, 32))  # 128 tokens x top-2 reach all 4 experts
    out = model(x[:, :-1], x[:, 1:])
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    for moe in model.moe_layers():
        assert (moe.load > 0).all(), "batch must reach every expert"
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_loss_is_cross_entropy_with_ignored_positions():
    model = Transformer(small()).eval()
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    y[0, :5] = IGNORE_INDEX
    out = model(x, y)
    logp = model(x).log_softmax(-1)
    keep = y != IGNORE_INDEX
    ref = -logp[keep].gather(-1, y[keep][:, None]).mean()
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert out.aux_loss is None


def test_token_dropout_replaces_inputs_and_masks_their_targets():
    cfg = small(token_dropout=0.5)
    model = Transformer(cfg).train()
    x = torch.randint(0, 97, (2, 64))
    tokens, targets = model._drop_tokens(x, x.clone())
    dropped = targets == IGNORE_INDEX
    assert 0.3 < dropped.float().mean() < 0.7
    assert torch.equal(tokens[~dropped], x[~dropped])
    model.eval()  # inference never drops
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_next_token_logits_equal_the_last_position_of_the_full_output():
    model = Transformer(small(n_routed_experts=4, experts_per_token=2)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(x)
        last = model.next_token_logits(x)
        cache = model.make_cache(2, 16)
        cached = model.next_token_logits(x, cache)
    assert last.shape == (2, 97) and cache.pos == 12
    assert torch.allclose(last, full[:, -1], atol=1e-6) and torch.allclose(cached, full[:, -1], atol=1e-5)
