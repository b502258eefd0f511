"""The comparison matrix: variant parsing, parameter matching within 2%, cells."""

from __future__ import annotations

import pytest

from latentformer.compare.matrix import FAMILIES, TOLERANCE, Family, cells, check_matching, count_params, load_family, parse_variant, resolve_variants
from latentformer.config import ModelConfig

COMMON = {"train.max_steps": 10}


@pytest.mark.parametrize("family, vocab", [("tiny", 4096), ("125m", 50257)])
def test_shipped_families_are_matched_within_2_percent(family, vocab):
    fam = FAMILIES[family]
    variants, ref = resolve_variants(fam, fam.variants, COMMON, vocab)
    assert ref == count_params(variants[fam.variants.index(fam.reference)].cfg.model)
    for v in variants:
        assert abs(count_params(v.cfg.model) / ref - 1) <= TOLERANCE, v.name
    assert check_matching(variants) == []
    assert {v.cfg.model.attention for v in variants} == {"mha", "gqa", "mqa", "mla"}


def test_tiny_baselines_need_no_matching():
    """The tiny family's d_ff values are the matcher's own output: nothing is adjusted at run time."""
    fam = FAMILIES["tiny"]
    variants, _ = resolve_variants(fam, ["mha", "gqa", "mqa"], COMMON, 4096)
    assert [v.matched_d_ff for v in variants] == [None, None, None]
    assert all(abs(v.deviation) < 0.01 for v in variants)
    assert variants[1].cfg.model.n_kv_heads == 2 and variants[2].cfg.model.n_kv_heads == 1
    # without their d_ff the baselines would be off by more than the tolerance
    mha = ModelConfig.preset("tiny").replace(attention="mha")
    assert abs(count_params(ModelConfig.from_dict(mha.to_dict() | {"head_dim": None})) / count_params(ModelConfig.preset("tiny")) - 1) > TOLERANCE


def test_rank_override_is_matched_by_d_ff():
    fam = FAMILIES["tiny"]
    (v,), ref = resolve_variants(fam, ["mla:kv_lora_rank=256"], COMMON, 4096)
    assert v.cfg.model.kv_lora_rank == 256
    assert v.matched_d_ff is not None and v.matched_d_ff % fam.d_ff_multiple == 0 and v.matched_d_ff < 704
    assert abs(v.deviation) <= TOLERANCE
    (raw,), _ = resolve_variants(fam, ["mla:kv_lora_rank=256"], COMMON, 4096, match=False)
    assert raw.matched_d_ff is None and raw.deviation > TOLERANCE
    assert check_matching([raw]) == [f"mla:kv_lora_rank=256 ({100 * raw.deviation:+.1f}%)"]


def test_a_width_the_user_chose_is_kept_and_reported():
    fam = FAMILIES["tiny"]
    (v,), _ = resolve_variants(fam, ["mla:kv_lora_rank=256:d_ff=704"], COMMON, 4096)
    assert v.matched_d_ff is None and v.cfg.model.d_ff == 704
    assert check_matching([v]) and v.deviation > TOLERANCE


def test_variant_syntax():
    fam = FAMILIES["tiny"]
    assert parse_variant("gqa:n_kv_heads=1", fam) == ("tiny", {"attention": "gqa", "n_kv_heads": "1", "d_ff": 720}, {"n_kv_heads"}, {})
    assert parse_variant("mha-125m", fam)[0] == "mha-125m"  # a preset that is not a member
    with pytest.raises(ValueError, match="neither a member"):
        parse_variant("xyz", fam)
    with pytest.raises(ValueError, match="field=value"):
        parse_variant("mla:kv_lora_rank", fam)
    with pytest.raises(ValueError, match="variant 'mla:nope=1'.*nope"):
        resolve_variants(fam, ["mla:nope=1"], COMMON, 4096)
    with pytest.raises(ValueError, match="given twice"):
        resolve_variants(fam, ["mla", "mla"], COMMON, 4096)


def test_variants_take_training_overrides():
    fam = FAMILIES["tiny"]
    assert parse_variant("mla:train.optimizer=muon:model.kv_lora_rank=64:d_ff=512", fam) == (
        "tiny", {"kv_lora_rank": "64", "d_ff": "512"}, {"kv_lora_rank", "d_ff"}, {"optimizer": "muon"})
    base, muon = resolve_variants(fam, ["mla", "mla:train.optimizer=muon:train.lr=0.01"], {**COMMON, "train.lr": 0.002}, 4096)[0]
    assert (base.cfg.train.optimizer, muon.cfg.train.optimizer) == ("adamw", "muon")
    assert (base.cfg.train.lr, muon.cfg.train.lr) == (0.002, 0.01)  # the variant's own over the common ones
    assert base.cfg.model == muon.cfg.model and muon.deviation == 0 and muon.train_overrides == {"optimizer": "muon", "lr": "0.01"}
    assert [c.name for c in cells([base, muon], 1)] == ["mla-s0", "mla_train.optimizer=muon_train.lr=0.01-s0"]
    (mtp,), _ = resolve_variants(fam, ["mla:model.mtp_depth=1"], COMMON, 4096)
    assert mtp.cfg.model.mtp_depth == 1 and mtp.matched_d_ff is None and mtp.deviation == 0  # served size: MTP left out
    with pytest.raises(ValueError, match="train.max_steps is shared by every cell"):
        parse_variant("mla:train.max_steps=5", fam)
    with pytest.raises(ValueError, match="'data.dir' is not a model field"):
        parse_variant("mla:data.dir=x", fam)
    with pytest.raises(ValueError, match="variant 'mla:train.optimizer=sgd'.*train.optimizer"):
        resolve_variants(fam, ["mla:train.optimizer=sgd"], COMMON, 4096)
    with pytest.raises(ValueError, match="variant 'mla:train.nope=1'.*nope"):
        resolve_variants(fam, ["mla:train.nope=1"], COMMON, 4096)


def test_cells_are_seed_major_with_distinct_seeds():
    fam = FAMILIES["tiny"]
    variants, _ = resolve_variants(fam, ["mha", "mla:kv_lora_rank=64"], COMMON, 4096)
    cs = cells(variants, 2)
    assert [c.name for c in cs] == ["mha-s0", "mla_kv_lora_rank=64-s0", "mha-s1", "mla_kv_lora_rank=64-s1"]
    assert cs[2].cfg.train.seed == cs[0].cfg.train.seed + 1
    assert cs[0].cfg.model == cs[2].cfg.model


def test_family_yaml(micro_family):
    fam = load_family(str(micro_family))
    assert fam.name == "micro" and set(fam.members) == {"mla", "mha"}
    assert Family.from_dict(fam.to_dict()) == fam
    with pytest.raises(ValueError, match="unknown family"):
        load_family("nope")
    with pytest.raises(ValueError, match="reference"):
        Family.from_dict({**fam.to_dict(), "reference": "gqa"})
