"""Static (device-addressed) cache mode, used for CUDA-graph decoding, equals the dynamic one."""

import pytest
import torch

from latentformer import Transformer

from .helpers import ATTENTION, small


@pytest.mark.parametrize("attention", ["mha", "gqa", "mla", "mla-q"])
@pytest.mark.parametrize("decode", ["absorb", "naive"])
@pytest.mark.parametrize("padded", [False, True])
def test_static_decode_equals_dynamic(attention, decode, padded):
    if decode == "naive" and not attention.startswith("mla"):
        pytest.skip("mla_decode applies to MLA only")
    cfg = small(**ATTENTION[attention], **({"mla_decode": decode} if attention.startswith("mla") else {}))
    model = Transformer(cfg).eval()
    x = torch.randint(0, 97, (2, 20))
    caches = [model.make_cache(2, 32), model.make_cache(2, 32)]
    outs = []
    with torch.no_grad():
        for static, cache in zip((False, True), caches):
            if padded:
                cache.set_left_padding([3, 0])
            logits = [model(x[:, :12], cache=cache)]
            cache.static = static
            for t in range(12, 20):
                logits.append(model(x[:, t:t + 1], cache=cache))
            outs.append(torch.cat(logits, 1))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert caches[1].pos == 20 and caches[1].length.item() == 20
    assert torch.equal(caches[0].layers[0][0], caches[1].layers[0][0])
