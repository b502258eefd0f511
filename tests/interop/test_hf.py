"""Hugging Face interop: transformers is the oracle (fp32, eager attention, tiny random models).

Import: models built in transformers -> save_pretrained -> import_hf -> same logits (full forward,
and absorbed incremental decode) and the same greedy tokens. Export: our random models ->
export_hf -> AutoModelForCausalLM.from_pretrained -> same logits; export then import is lossless.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from latentformer.checkpoint import load, save_checkpoint  # noqa: E402
from latentformer.cli import main  # noqa: E402
from latentformer.config import ModelConfig  # noqa: E402
from latentformer.data.tokenizer import train_bpe  # noqa: E402
from latentformer.interop.hf import export_hf, import_hf  # noqa: E402
from latentformer.model.moe import MoE  # noqa: E402
from latentformer.model.norm import RMSNorm  # noqa: E402
from latentformer.model.transformer import Transformer  # noqa: E402

TOL = 1e-4
V = 96

MLA_SHAPE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=48,
                 moe_intermediate_size=16, max_position_embeddings=64, initializer_range=0.1, num_nextn_predict_layers=0)


def _hf_model(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # non-trivial norms, q/k/v biases and router bias
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _tokens(n=20, seed=1):
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(seed))


def _incremental_logits(model: Transformer, tokens: torch.Tensor, prefill: int = 5) -> torch.Tensor:
    """Prefill `prefill` tokens, then one token per step through the cache (absorbed MLA decode)."""
    cache = model.make_cache(tokens.shape[0], tokens.shape[1])
    out = [model(tokens[:, :prefill], cache=cache)]
    out += [model(tokens[:, t:t + 1], cache=cache) for t in range(prefill, tokens.shape[1])]
    return torch.cat(out, dim=1)


def _greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    cache = model.make_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits, out = model(prompt, cache=cache), []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, dim=1)


def _randomize(model: Transformer) -> Transformer:
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
            if isinstance(m, MoE) and m.cfg.router_scoring == "sigmoid":
                m.router.bias.copy_(torch.randn_like(m.router.bias) * 0.1)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    return model.eval()


V3_CASES = {
    # MoE, query compression, interleaved rope, group-limited routing (2 groups, keep 1), 1 shared expert
    "moe-qlora-interleave-groups": dict(q_lora_rank=12, rope_interleave=True, n_routed_experts=8, n_shared_experts=1,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                        routed_scaling_factor=2.5, norm_topk_prob=True),
    # MoE, no query compression, half-split rope, YaRN, no shared experts, unnormalized top-k
    "moe-yarn-noshared": dict(q_lora_rank=None, rope_interleave=False, n_routed_experts=4, n_shared_experts=0,
                              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                              routed_scaling_factor=1.5, norm_topk_prob=False,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                               "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                               "mscale": 1.0, "mscale_all_dim": 0.707}),
    # dense (every layer a dense MLP), query compression, half-split rope
    "dense-qlora": dict(q_lora_rank=12, rope_interleave=False, n_routed_experts=4, first_k_dense_replace=2),
}


@pytest.mark.parametrize("case", list(V3_CASES))
def test_import_deepseek_v3_logits(tmp_path, case):
    hf = _hf_model(transformers.DeepseekV3Config(**MLA_SHAPE, **V3_CASES[case]))
    hf.save_pretrained(tmp_path)
    model, tok = import_hf(tmp_path)
    assert tok is None
    x = _tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert ref.std() > 0.1  # a model whose logits mean something
        assert (model(x) - ref).abs().max() <= TOL
        assert (_incremental_logits(model, x) - ref).abs().max() <= TOL


def test_import_deepseek_v3_greedy_generation(tmp_path):
    hf = _hf_model(transformers.DeepseekV3Config(**MLA_SHAPE, **V3_CASES["moe-qlora-interleave-groups"]))
    hf.save_pretrained(tmp_path)
    model, _ = import_hf(tmp_path)
    prompt = _tokens(6)
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)[:, prompt.shape[1]:]
        assert torch.equal(_greedy(model, prompt, 32), ref)


def test_import_deepseek_v2_softmax_moe(tmp_path):
    shape = {k: v for k, v in MLA_SHAPE.items() if k != "num_nextn_predict_layers"}
    hf = _hf_model(transformers.DeepseekV2Config(**shape, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                                                 num_experts_per_tok=2, n_group=4, topk_group=2,
                                                 topk_method="group_limited_greedy", first_k_dense_replace=1,
                                                 routed_scaling_factor=1.0))
    hf.save_pretrained(tmp_path)
    model, _ = import_hf(tmp_path)
    assert model.config.router_scoring == "softmax" and model.config.rope_interleave
    x = _tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max() <= TOL
        assert (_incremental_logits(model, x) - ref).abs().max() <= TOL


def test_import_llama_gqa_logits_and_generation(tmp_path):
    hf = _hf_model(transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                            initializer_range=0.1))
    hf.save_pretrained(tmp_path)
    model, _ = import_hf(tmp_path)
    assert model.config.attention == "gqa" and model.config.n_kv_heads == 2
    x, prompt = _tokens(), _tokens(6, seed=2)
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max() <= TOL
        assert (_incremental_logits(model, x) - ref).abs().max() <= TOL
        gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)[:, prompt.shape[1]:]
        assert torch.equal(_greedy(model, prompt, 32), gen)


LLAMA_SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
# rope_theta 500 with head_dim 8: wavelengths 6.3, 30, 140, 665 tokens; an original context of 16 puts
# the first in llama3's interpolated band and the rest in its stretched one
ARCH_CASES = {
    "llama3.1-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0})),
    "llama-dynamic-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 4.0})),
    # Qwen2.5's configs carry a window with use_sliding_window=false: no window applies
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, sliding_window=16, use_sliding_window=False,
                                                                rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral-head-dim": ("MistralConfig", "LlamaForCausalLM", dict(sliding_window=None, head_dim=12)),
    "mistral-window-covers-context": ("MistralConfig", "LlamaForCausalLM", dict(sliding_window=64)),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_import_export_llama_family(tmp_path, case):
    config_class, exported_as, extra = ARCH_CASES[case]
    hf = _hf_model(getattr(transformers, config_class)(**LLAMA_SHAPE, **extra))
    hf.save_pretrained(tmp_path / "src")
    model, _ = import_hf(tmp_path / "src")
    x, prompt = _tokens(40), _tokens(6, seed=2)
    with torch.no_grad():
        ref = hf(x).logits
        assert ref.std() > 0.1
        assert (model(x) - ref).abs().max() <= TOL
        assert (_incremental_logits(model, x) - ref).abs().max() <= TOL
        gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)[:, prompt.shape[1]:]
        assert torch.equal(_greedy(model, prompt, 24), gen)
    export_hf(model, None, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [exported_as]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max() <= TOL


def test_rope_scalings_change_the_model(tmp_path):
    """The cases above are oracles only if each scaling changes the logits against plain rope."""
    x = _tokens(40)
    for case in ("llama3.1-rope", "llama-linear-rope"):
        hf = _hf_model(transformers.LlamaConfig(**LLAMA_SHAPE, **ARCH_CASES[case][2]))
        hf.save_pretrained(tmp_path / case)
        model, _ = import_hf(tmp_path / case)
        plain = Transformer(model.config.replace(rope_scaling="none", rope_scaling_factor=1.0))
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain.eval()(x) - model(x)).abs().max() > 1e-2


YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

def _drop(*keys):
    """An edit that deletes `keys` from config.json and original_max_position_embeddings from its rope
    dicts (save_pretrained writes the value transformers resolved)."""
    def edit(c):
        for key in keys:
            c.pop(key, None)
        for rope in (c.get("rope_parameters"), c.get("rope_scaling")):
            if isinstance(rope, dict):
                rope.pop("original_max_position_embeddings", None)
    return edit


# config.json edits where transformers' precedence decides the model: (config class, rope_parameters,
# the edit of the saved config.json)
PRECEDENCE_CASES = {
    # a top-level original_max_position_embeddings wins over the rope dict's (Phi-3 style)
    "yarn-top-level-original": ("LlamaConfig", YARN, lambda c: c.update(original_max_position_embeddings=32)),
    "llama3-top-level-original": ("LlamaConfig", LLAMA3, lambda c: c.update(original_max_position_embeddings=32)),
    "deepseek-yarn-top-level-original": ("DeepseekV3Config", YARN, lambda c: c.update(original_max_position_embeddings=32)),
    # an empty rope_scaling is no rope_scaling: rope_parameters applies
    "empty-rope-scaling": ("LlamaConfig", YARN, lambda c: c.update(rope_scaling={})),
    # neither names the original context: max_position_embeddings stands in (transformers' class
    # default, 2048 for Llama, when config.json has none)
    "llama3-no-original": ("LlamaConfig", LLAMA3, _drop()),
    "yarn-no-max-positions": ("LlamaConfig", YARN, _drop("max_position_embeddings")),
}


@pytest.mark.parametrize("case", list(PRECEDENCE_CASES))
def test_import_follows_transformers_precedence(tmp_path, case):
    """Our logits == those of transformers loading the same edited config.json, and so is the original context."""
    config_class, rope, edit = PRECEDENCE_CASES[case]
    shape = MLA_SHAPE if config_class == "DeepseekV3Config" else LLAMA_SHAPE
    _hf_model(getattr(transformers, config_class)(**shape, rope_parameters=dict(rope))).save_pretrained(tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    edit(hf_cfg)
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    model, _ = import_hf(tmp_path)
    x = _tokens(60)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= TOL
    cfg = model.config  # the original context too, where a case's logits cannot tell two values apart
    ours = cfg.yarn_original_max_seq_len if rope["rope_type"] == "yarn" else cfg.llama3_original_max_seq_len
    assert ours == hf.config.rope_parameters["original_max_position_embeddings"]


def test_import_refuses_a_null_top_level_original_context(tmp_path):
    _write_hf_config(tmp_path / "hf", rope_parameters=dict(YARN), original_max_position_embeddings=None)
    with pytest.raises(ValueError, match="'original_max_position_embeddings' is null"):
        import_hf(tmp_path / "hf")


def _deepseek_v3(**changes):
    return _hf_model(transformers.DeepseekV3Config(**MLA_SHAPE, **{**V3_CASES["moe-qlora-interleave-groups"], **changes}))


def test_import_export_deepseek_with_its_own_rms_norm_eps(tmp_path):
    """Moonlight-style: rms_norm_eps for the block norms, 1e-6 for the latent norms (as transformers).
    A large eps makes the two distinguishable at this tolerance."""
    hf = _deepseek_v3(rms_norm_eps=0.05)
    hf.save_pretrained(tmp_path / "src")
    model, _ = import_hf(tmp_path / "src")
    assert model.config.norm_eps == 0.05 and model.config.latent_eps == 1e-6
    x = _tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max() <= TOL
        assert (_incremental_logits(model, x) - ref).abs().max() <= TOL
        wrong = Transformer(model.config.replace(latent_norm_eps=None))
        wrong.load_state_dict(model.state_dict())
        assert (wrong.eval()(x) - ref).abs().max() > 1e-3
    export_hf(model, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max() <= TOL


def test_import_kimi_k2_is_deepseek_v3(tmp_path):
    hf = _deepseek_v3()
    hf.save_pretrained(tmp_path / "src")
    cfg_path = tmp_path / "src" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "kimi_k2"}))
    model, _ = import_hf(tmp_path / "src")
    x = _tokens()
    with torch.no_grad():
        ref = hf(x).logits
        assert (model(x) - ref).abs().max() <= TOL
    export_hf(model, None, tmp_path / "out")  # written as what transformers reads it as
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "deepseek_v3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max() <= TOL


def test_import_sharded_checkpoint(tmp_path):
    hf = _hf_model(transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                            tie_word_embeddings=True, initializer_range=0.1))
    hf.save_pretrained(tmp_path, max_shard_size="10KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = import_hf(tmp_path)
    assert model.config.attention == "mqa" and model.config.tie_embeddings
    x = _tokens()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= TOL


EXPORT_CASES = {
    "mla-moe-sigmoid": dict(attention="mla", q_lora_rank=12, rope_interleave=True, n_routed_experts=8, n_shared_experts=1,
                            experts_per_token=2, router_scoring="sigmoid", n_expert_groups=4, topk_groups=2,
                            routed_scaling_factor=2.0, first_k_dense_layers=1, moe_d_ff=16),
    "mla-moe-noshared-yarn": dict(attention="mla", n_routed_experts=4, n_shared_experts=0, experts_per_token=2,
                                  router_scoring="sigmoid", norm_topk_prob=False, moe_d_ff=16, yarn_factor=4.0,
                                  yarn_original_max_seq_len=16, yarn_mscale=0.707, yarn_mscale_all_dim=1.0),
    "mla-dense-tied": dict(attention="mla", tie_embeddings=True),
    "mla-moe-softmax-v2": dict(attention="mla", rope_interleave=True, n_routed_experts=4, n_shared_experts=1,
                               experts_per_token=2, router_scoring="softmax", norm_topk_prob=False,
                               n_expert_groups=2, topk_groups=1, moe_d_ff=16),
    "gqa-llama-yarn": dict(attention="gqa", n_kv_heads=2, head_dim=8, norm_eps=1e-5, yarn_factor=4.0,
                           yarn_original_max_seq_len=16),
}
BASE = dict(vocab_size=V, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=12, d_ff=48)


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers_and_round_trips(tmp_path, case):
    torch.manual_seed(0)
    ours = _randomize(Transformer(ModelConfig(**BASE).replace(**EXPORT_CASES[case])))  # gqa: BASE's MLA sizes unset
    export_hf(ours, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
    x = _tokens()
    with torch.no_grad():
        ref = ours(x)
        assert ref.std() > 0.1
        assert (hf(x).logits - ref).abs().max() <= TOL
    back, _ = import_hf(tmp_path / "hf")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, feature", [
    (dict(pos_embedding="learned"), "pos_embedding"),
    (dict(rope=False, qk_rope_head_dim=0, pos_embedding="sinusoid"), "pos_embedding"),
    (dict(norm_placement="post"), "norm_placement"),
    (dict(norm="layernorm"), "norm=layernorm"),
    (dict(final_norm=False), "final_norm"),
    (dict(ffn="gelu"), "ffn=gelu"),
    (dict(n_routed_experts=4, router_scoring="sigmoid", router_noise=True), "router_noise"),
    (dict(n_routed_experts=4, router_scoring="sigmoid", capacity_factor=1.25), "capacity_factor"),
    (dict(n_routed_experts=4, router_scoring="softmax", norm_topk_prob=True, rope_interleave=True), "norm_topk_prob"),
    (dict(n_routed_experts=4, router_scoring="softmax", norm_topk_prob=False), "rope_interleave"),
    (dict(n_routed_experts=4, router_scoring="sigmoid", n_expert_groups=4, topk_groups=2), "expert groups of one"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(attention="gqa", n_kv_heads=2, rope_interleave=True), "rope_interleave"),
    (dict(attention="mha", n_routed_experts=4), "Mixture-of-Experts"),
])
def test_export_refuses_inexpressible_features(tmp_path, change, feature):
    model = Transformer(ModelConfig(**BASE).replace(**change))
    with pytest.raises(ValueError, match=feature):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_router_bias_with_softmax(tmp_path):
    model = Transformer(ModelConfig(**BASE, n_routed_experts=4, router_scoring="softmax", norm_topk_prob=False,
                                    rope_interleave=True))
    model.moe_layers()[0].router.bias.fill_(0.1)
    with pytest.raises(ValueError, match="router bias"):
        export_hf(model, None, tmp_path / "hf")


def _write_hf_config(path, **changes):
    hf = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=64).to_dict()
    hf.update(changes)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("change, feature", [
    (dict(attention_bias=True), "attention bias"),
    (dict(mlp_bias=True), "MLP bias"),
    (dict(hidden_act="gelu"), "activation"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 8.0}), "longrope"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (dict(model_type="mistral", sliding_window=16), "sliding-window"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0), "sliding-window"),
    (dict(model_type="gemma"), "gemma"),
])
def test_import_refuses_unsupported_features(tmp_path, change, feature):
    _write_hf_config(tmp_path / "hf", **change)
    with pytest.raises(ValueError, match=feature):
        import_hf(tmp_path / "hf")


def test_import_never_unpickles(tmp_path):
    _write_hf_config(tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match="never unpickles"):
        import_hf(tmp_path / "hf")


def test_cli_convert_round_trip_with_tokenizer(tmp_path, capsys):
    text = ["the quick brown fox jumps over the lazy dog, again and again. " * 4] * 8
    tok = train_bpe(text, vocab_size=300)
    torch.manual_seed(0)
    ours = _randomize(Transformer(ModelConfig(**{**BASE, "vocab_size": 320}, tie_embeddings=True)))
    save_checkpoint(tmp_path / "ckpt", ours, tok)
    assert main(["convert", "--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = "the lazy fox jumps"
    assert hf_tok(sample)["input_ids"] == tok.encode(sample)
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    model, tok2 = load(tmp_path / "back", device="cpu")
    assert tok2.encode(sample) == tok.encode(sample)
    x = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))
    # a name that is no directory is a hub id: offline, one clear line and a quick failure
    capsys.readouterr()
    assert main(["convert", "--from", "hf", "no-such-org/no-such-model", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offline" in err


def test_gpt2_tokenizer_exports_as_identical_hf_tokenizer(tmp_path):
    pytest.importorskip("tiktoken")
    from latentformer.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer("gpt2")
    except ValueError as e:
        pytest.skip(str(e))
    model = Transformer(ModelConfig(**{**BASE, "vocab_size": tok.vocab_size, "n_layers": 1, "d_model": 16, "d_ff": 16}))
    export_hf(model, tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = "Hello world!  It's 2026: naïve café, tabs\tand\nnewlines."
    assert hf_tok(sample)["input_ids"] == tok.encode(sample)
    assert hf_tok.eos_token_id == tok.eot_id == 50256


@pytest.mark.parametrize("change, field", [
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(rope_scaling="linear", rope_scaling_factor=0.5), "rope_scaling_factor"),
    (dict(rope_scaling="linear", rope_scaling_factor=2.0, yarn_factor=4.0), "rope_scaling"),
    (dict(rope_scaling="llama3", rope_scaling_factor=8.0, llama3_low_freq_factor=4.0, llama3_high_freq_factor=1.0), "llama3_high_freq_factor"),
    (dict(latent_norm_eps=0.0), "latent_norm_eps"),
    (dict(qkv_bias=True), "qkv_bias"),  # BASE is MLA: no q/k/v projections
])
def test_interop_config_fields_are_validated(change, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        ModelConfig(**BASE, **change)


def test_configs_written_before_the_interop_fields_load_unchanged():
    old = {k: v for k, v in ModelConfig(**BASE).to_dict().items()
           if k not in ("rope_scaling", "rope_scaling_factor", "llama3_low_freq_factor", "llama3_high_freq_factor",
                        "llama3_original_max_seq_len", "latent_norm_eps", "qkv_bias")}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.rope_scaling, cfg.latent_eps, cfg.qkv_bias) == ("none", cfg.norm_eps, False)
