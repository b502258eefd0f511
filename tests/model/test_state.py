"""What a checkpoint holds: parameters and learned state only, never derived buffers."""

import pytest
import torch

from latentformer import Transformer
from latentformer.checkpoint import model_from_state

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


@pytest.mark.parametrize("with_lm_head", [False, True])
def test_model_from_state_equals_the_original(with_lm_head):
    """load_model's and import_hf's path: build on meta, assign the state, tie, rebuild derived buffers.
    A tied output layer is the embedding whether or not the state lists it."""
    cfg = small(pos_embedding="sinusoid", n_routed_experts=4, experts_per_token=2, router_bias_update_rate=0.01,
                tie_embeddings=True, yarn_factor=2.0, yarn_original_max_seq_len=16)
    model = Transformer(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items() if with_lm_head or k != "lm_head.weight"}
    twin = model_from_state(cfg, state, "test weights").eval()
    assert twin.lm_head.weight is twin.embed.weight
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_model_from_state_names_the_source_of_a_mismatch():
    cfg = small()
    state = Transformer(cfg).state_dict()
    with pytest.raises(ValueError, match=r"^ckpt/model.safetensors does not match its config: missing \['embed.weight'\]"):
        model_from_state(cfg, {k: v for k, v in state.items() if k != "embed.weight"}, "ckpt/model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        model_from_state(cfg, {**state, "extra": torch.zeros(1)}, "ckpt")
