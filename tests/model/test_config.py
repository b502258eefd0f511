"""ModelConfig: validation names the field; dict/JSON/YAML round trips; presets load."""

import json

import pytest
import torch

from latentformer import ModelConfig, Transformer
from latentformer.config import apply_overrides, from_dict, preset_names


@pytest.mark.parametrize("kwargs, field", [
    (dict(attention="mha", d_model=30, n_heads=4), "d_model"),
    (dict(attention="gqa", n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(attention="gqa"), "n_kv_heads"),
    (dict(attention="mla", qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(attention="mha", d_model=36, n_heads=4, head_dim=9), "head_dim"),
    (dict(n_routed_experts=4, experts_per_token=5), "experts_per_token"),
    (dict(attention="flash"), "attention"),
    (dict(n_routed_experts=6, n_expert_groups=4), "n_expert_groups"),
    (dict(n_routed_experts=8, n_expert_groups=4, topk_groups=1, experts_per_token=3), "topk_groups"),
    (dict(rope=False), "rope"),
    (dict(norm="batchnorm"), "norm"),
    (dict(ffn="relu"), "ffn"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(yarn_factor=0.5), "yarn_factor"),
    (dict(pos_embedding="alibi"), "pos_embedding"),
])
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_from_dict_rejects_unknown_and_mistyped_fields():
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict({"n_layer": 3})
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_dict({"n_layers": "three"})
    with pytest.raises(ValueError, match="tie_embeddings"):
        ModelConfig.from_dict({"tie_embeddings": "maybe"})


def test_old_configs_with_mla_decode_still_load():
    """mla_decode was a model field; it is an inference choice now (infer.decode.Decoder): checkpoints
    written before hold it in config.json, and it is dropped on load, also nested in a run config."""
    from latentformer.train.config import RunConfig

    old = {**ModelConfig.preset("tiny").to_dict(), "mla_decode": "naive"}
    assert ModelConfig.from_dict(old) == ModelConfig.preset("tiny")
    assert "mla_decode" not in ModelConfig.preset("tiny").to_dict()
    assert from_dict(RunConfig, {"model": old}).model == ModelConfig.preset("tiny")


@pytest.mark.parametrize("name", preset_names())
def test_presets_round_trip(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    json.dumps(cfg.to_dict())  # JSON-safe
    with torch.device("meta"):
        Transformer(cfg)  # every preset builds


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny"):
        ModelConfig.preset("nope")


def test_overrides_are_typed():
    cfg = apply_overrides(ModelConfig(), {"n_layers": "6", "rope_interleave": "true", "yarn_factor": "2"})
    assert cfg.n_layers == 6 and cfg.rope_interleave is True and cfg.yarn_factor == 2.0
    with pytest.raises(ValueError, match="n_layer"):
        apply_overrides(ModelConfig(), {"n_layer": "6"})


def test_expected_preset_shapes():
    assert ModelConfig.preset("tiny").attention == "mla"
    big = ModelConfig.preset("latentformer-348m")
    assert (big.n_layers, big.n_heads, big.d_model, big.kv_lora_rank) == (12, 16, 1280, 256)
    moe = ModelConfig.preset("moe-mla-small")
    assert moe.is_moe and moe.attention == "mla"
