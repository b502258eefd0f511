"""Causality: changing tokens after t never changes the logits at positions <= t."""

import pytest
import torch

from latentformer import Transformer

from .helpers import grid, small

CASES = dict(grid())


@pytest.mark.parametrize("name", list(CASES))
def test_future_tokens_do_not_change_past_logits(name):
    model = Transformer(small(**CASES[name])).eval()
    x = torch.randint(0, 97, (2, 24))
    t = 11
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 97, y[:, t + 1:].shape)
    with torch.no_grad():
        lx, ly = model(x), model(y)
    assert torch.allclose(lx[:, : t + 1], ly[:, : t + 1], atol=1e-6)
    # the oracle can fail: later positions do see the change
    assert not torch.allclose(lx[:, t + 1:], ly[:, t + 1:], atol=1e-3)


def test_no_causal_leak_through_moe_capacity():
    """With token dropping, a token's routing must not depend on later tokens of its own sequence
    beyond what capacity implies; here capacity is ample so outputs stay causal."""
    model = Transformer(small(**CASES["mla|rope|pre-rms|moe"], capacity_factor=8.0)).eval()
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 97
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :10], model(y)[:, :10], atol=1e-6)
