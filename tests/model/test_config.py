"""ModelConfig: validation names the field; dict/JSON/YAML round trips; presets load."""

import dataclasses
import json

import pytest
import torch

from latentformer import ModelConfig, Transformer
from latentformer.config import ATTENTION_FIELDS, MLA_DEFAULTS, MLA_FIELDS, apply_overrides, from_dict, preset_names
from latentformer.train.config import build_run_config


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


# -- fields of another attention kind --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("field, value", [("q_lora_rank", 0), ("kv_lora_rank", 64), ("qk_nope_head_dim", 32),
                                          ("qk_rope_head_dim", 16), ("v_head_dim", 32), ("latent_norm_eps", 1e-6)])
def test_mha_family_refuses_mla_fields(kind, field, value):
    kv = {"n_kv_heads": 2} if kind == "gqa" else {}
    with pytest.raises(ValueError, match=f"^{field}: is a field of attention mla, unused by attention {kind}"):
        ModelConfig(attention=kind, **kv, **{field: value})  # even at MLA's default value: it is set, and ignored


@pytest.mark.parametrize("field, value", [("n_kv_heads", 4), ("head_dim", 64)])
def test_mla_refuses_mha_family_fields(field, value):
    with pytest.raises(ValueError, match=f"^{field}: is a field of attention mha/gqa/mqa, unused by attention mla"):
        ModelConfig(attention="mla", **{field: value})


def test_the_owned_fields_cover_every_kind_specific_field():
    assert set(MLA_FIELDS) == set(MLA_DEFAULTS) | {"latent_norm_eps"}
    mha, mla = ModelConfig(attention="mha").to_dict(), ModelConfig(attention="mla").to_dict()
    # what an MHA config leaves unset is exactly what MLA owns, and the reverse
    assert {k for k, v in mha.items() if v is None} == set(ATTENTION_FIELDS["mla"])
    assert {k for k, v in mla.items() if v is None} == set(ATTENTION_FIELDS["mha"]) | {"latent_norm_eps"}


def test_mla_fills_its_defaults_and_round_trips():
    cfg = ModelConfig()
    assert {k: getattr(cfg, k) for k in MLA_DEFAULTS} == MLA_DEFAULTS  # the sizes every config had before
    assert ModelConfig(rope=False, pos_embedding="learned").qk_rope_head_dim == 0  # no rope key without rope
    for c in (cfg, ModelConfig(attention="gqa", n_kv_heads=2), ModelConfig(attention="mla", latent_norm_eps=1e-5)):
        assert ModelConfig.from_dict(c.to_dict()) == c and ModelConfig.from_json(c.to_json()) == c


# an mha config.json as every checkpoint before MLA's fields defaulted to None wrote it (the old defaults)
OLD_MHA = {**ModelConfig(attention="mha").to_dict(), **MLA_DEFAULTS, "latent_norm_eps": None}


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mla_sizes", [MLA_DEFAULTS, dict(q_lora_rank=0, kv_lora_rank=96, qk_nope_head_dim=48,
                                                           qk_rope_head_dim=16, v_head_dim=64)])
def test_old_format_dicts_load_without_the_mla_fields(kind, mla_sizes):
    # old to_dict wrote every MLA size whatever the kind: the defaults, or a preset's (the compare family's
    # mha/gqa/mqa cells were built from the MLA preset tiny: kv_lora_rank 96, ...). The model never used them.
    old = {**OLD_MHA, **mla_sizes, "attention": kind, "n_kv_heads": {"mha": 4, "gqa": 2, "mqa": 1}[kind]}
    cfg = ModelConfig.from_dict(old)
    assert cfg == ModelConfig(attention=kind, n_kv_heads=old["n_kv_heads"])
    assert all(getattr(cfg, k) is None for k in MLA_FIELDS)
    assert ModelConfig.from_json(json.dumps(old)) == cfg


def test_new_format_dicts_setting_some_mla_fields_are_refused():
    new = ModelConfig(attention="mha").to_dict()
    for field in MLA_FIELDS:
        with pytest.raises(ValueError, match=f"^{field}: is a field of attention mla"):
            ModelConfig.from_dict({**new, field: 0.5 if field == "latent_norm_eps" else 64})
    # an old-format dict missing one MLA size is no longer "as written by to_dict": checked as given
    with pytest.raises(ValueError, match="^kv_lora_rank: is a field of attention mla"):
        ModelConfig.from_dict({**OLD_MHA, "q_lora_rank": None})


def test_changing_the_kind_unsets_the_old_kinds_fields():
    tiny = ModelConfig.preset("tiny")  # MLA, kv_lora_rank 96
    mha = tiny.replace(attention="mha")
    assert mha == ModelConfig(**{**tiny.to_dict(), **{k: None for k in MLA_FIELDS}, "attention": "mha"})
    assert mha.replace(attention="mla") == tiny.replace(kv_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32)  # defaults
    assert tiny.replace(attention="gqa", n_kv_heads=2).n_kv_heads == 2
    with pytest.raises(ValueError, match="^kv_lora_rank: is a field of attention mla"):
        tiny.replace(attention="mha", kv_lora_rank=32)  # set together with the new kind: refused, not dropped
    assert apply_overrides(tiny, {"attention": "mqa"}) == tiny.replace(attention="mqa")
    with pytest.raises(ValueError, match="^kv_lora_rank: is a field of attention mla"):
        apply_overrides(tiny, {"attention": "mqa", "kv_lora_rank": "64"})
    with pytest.raises(ValueError, match="^kv_lora_rank: is a field of attention mla"):
        apply_overrides(ModelConfig.preset("mha-125m"), {"kv_lora_rank": "64"})


def test_run_configs_change_the_kind_of_a_preset(tmp_path):
    cfg, _ = build_run_config(preset="tiny", overrides={"model.attention": "gqa", "model.n_kv_heads": "2"})
    assert cfg.model == ModelConfig.preset("tiny").replace(attention="gqa", n_kv_heads=2)
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmodel:\n  attention: mha\n")
    assert build_run_config(yaml_path=path)[0].model == ModelConfig.preset("tiny").replace(attention="mha")
    path.write_text("preset: tiny\nmodel:\n  attention: mha\n  kv_lora_rank: 32\n")
    with pytest.raises(ValueError, match="^kv_lora_rank: is a field of attention mla"):
        build_run_config(yaml_path=path)
    with pytest.raises(ValueError, match="^kv_lora_rank: is a field of attention mla"):
        build_run_config(preset="mha-125m", overrides={"model.kv_lora_rank": "64"})


@pytest.mark.parametrize("field, value", [("mtp_depth", 1), ("kv_latent_norm", False)])
def test_fields_added_later_are_written_only_when_set(field, value):
    """A config that does not use multi-token prediction (or keeps MLA's latent norm) writes no
    `mtp_depth` (`kv_latent_norm`), so versions from before it (which refuse unknown fields) still read
    the checkpoint, byte for byte as before; one that does round-trips."""
    plain = ModelConfig.preset("tiny")
    for cfg in (plain, plain.replace(attention="gqa", n_kv_heads=2)):
        assert field not in cfg.to_dict() and ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert list(plain.to_dict()) == [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("mtp_depth", "kv_latent_norm")]
    changed = plain.replace(**{field: value})
    assert changed.to_dict()[field] == value and ModelConfig.from_dict(changed.to_dict()) == changed


def test_kv_latent_norm_off_is_mla_only():
    with pytest.raises(ValueError, match="^kv_latent_norm: false applies to mla only"):
        ModelConfig(attention="gqa", n_kv_heads=2, kv_latent_norm=False)
    assert apply_overrides(ModelConfig.preset("tiny"), {"kv_latent_norm": "false"}).kv_latent_norm is False
