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


def test_meta_built_model_with_loaded_weights_equals_the_original():
    """load_model's path: build on meta, assign the saved state, rebuild derived buffers."""
    cfg = small(pos_embedding="sinusoid", n_routed_experts=4, experts_per_token=2, router_bias_update_rate=0.01,
                tie_embeddings=True, yarn_factor=2.0, yarn_original_max_seq_len=16)
    model = Transformer(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with torch.device("meta"):
        twin = Transformer(cfg)
    twin.load_state_dict(state, strict=False, assign=True)
    twin.lm_head.weight = twin.embed.weight
    twin.init_derived_buffers()
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x), twin.eval()(x))
