"""An imported model's own tokenizer, with transformers as the oracle: its special tokens encode as
single ids, its chat template renders as transformers renders it, its eos ids stop generation, and
export writes them back unchanged (convert --from hf, then --to hf)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from latentformer.checkpoint import load  # noqa: E402
from latentformer.cli import main  # noqa: E402
from latentformer.infer.chat import render_chat  # noqa: E402
from latentformer.infer.generate import generate  # noqa: E402
from latentformer.interop.hf import import_hf  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what does the assistant answer?"}]


def _model_dir(path, specials, bos, eos, pad, eos_ids, generation_eos):
    """A tiny Llama saved by transformers with a trained byte-level BPE carrying `specials`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the user asks what the assistant answers, briefly"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad)
    hf_tok.chat_template = CHATML
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, bos_token_id=hf_tok.convert_tokens_to_ids(bos),
                                   eos_token_id=eos_ids, pad_token_id=hf_tok.convert_tokens_to_ids(pad) if pad else None)
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = generation_eos
    model.save_pretrained(path)
    return path, hf_tok


CASES = {
    # no <|endoftext|> at all (eot is the config's eos); bos <|im_start|>, eos <|im_end|>
    "chatml-no-endoftext": dict(specials=["<unk>", "<|im_start|>", "<|im_end|>"], bos="<|im_start|>", eos="<|im_end|>",
                                pad=None, eos_ids=2, generation_eos=2),
    # Qwen2.5-Instruct-like: <|endoftext|> separates documents and pads, <|im_end|> ends a turn; two eos ids
    "qwen-two-eos": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos="<|endoftext|>", eos="<|im_end|>",
                         pad="<|endoftext|>", eos_ids=[2, 0], generation_eos=[2, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tokenizer_imports_and_exports_unchanged(tmp_path, capsys, case):
    src, hf_tok = _model_dir(tmp_path / "src", **CASES[case])
    model, tok = import_hf(src)
    assert tok.kind == "hf"
    eos_ids = CASES[case]["eos_ids"]
    assert tok.stop_ids >= set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    assert (tok.bos_token, tok.eos_token) == (hf_tok.bos_token, hf_tok.eos_token)
    prompt = render_chat(tok, MESSAGES)
    assert prompt == hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    assert ids == hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(hf_tok.convert_tokens_to_ids("<|im_start|>")) == 3  # one id per <|im_start|>

    assert main(["convert", "--from", "hf", str(src), str(tmp_path / "ckpt")]) == 0
    _, back = load(tmp_path / "ckpt", device="cpu")
    assert back.describe() == tok.describe()
    assert main(["convert", "--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    for name in ("config.json", "generation_config.json"):
        a, b = json.loads((src / name).read_text()), json.loads((tmp_path / "out" / name).read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert b.get(key) == a.get(key), (name, key)
    out_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (out_tok.bos_token_id, out_tok.eos_token_id, out_tok.pad_token_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id)
    assert out_tok.chat_template == CHATML
    assert out_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == prompt
    assert out_tok(prompt, add_special_tokens=False)["input_ids"] == ids


def test_generation_stops_at_the_models_eos(tmp_path):
    src, hf_tok = _model_dir(tmp_path / "src", **CASES["chatml-no-endoftext"])
    model, tok = import_hf(src)
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    prompt = render_chat(tok, MESSAGES)
    assert generate(model, tok, prompt, max_new_tokens=8, temperature=0) != ""
    with torch.no_grad():  # a residual stream along ones(d) everywhere, read by <|im_end|>'s row alone
        model.embed.weight += 100.0
        model.norm.weight.fill_(1.0)
        model.lm_head.weight[im_end] = 10.0
    assert generate(model, tok, prompt, max_new_tokens=8, temperature=0) == ""
