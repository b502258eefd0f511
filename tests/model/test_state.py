"""What a checkpoint holds: parameters and learned state only, never derived buffers."""

import torch

from latentformer import Transformer

from .helpers import small


def test_state_dict_holds_no_derived_buffers():
    cfg = small(pos_embedding="sinusoid", n_routed_experts=4, experts_per_token=2, router_scoring="sigmoid",
                router_bias_update_rate=0.01)
    model = Transformer(cfg)
    params = {n for n, _ in model.named_parameters()}
    extra = set(model.state_dict()) - params - {"lm_head.weight"}
    # the only buffer saved is the router's balancing bias: learned state, not derivable
    assert extra == {f"layers.{i}.ffn.router.bias" for i in range(cfg.n_layers)}
    assert not any("inv_freq" in k or "load_since_update" in k for k in model.state_dict())


def test_meta_instantiation_of_large_presets_allocates_nothing():
    from latentformer import ModelConfig

    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("deepseek-v2-lite"))
    assert all(p.is_meta for p in model.parameters())
