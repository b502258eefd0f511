"""latentformer.generate: batching, reproducibility, stop conditions, streaming, bad input."""

from __future__ import annotations

import pytest
import torch

import latentformer as lf
from latentformer.data.tokenizer import ByteTokenizer, load_tokenizer

EOT = 256


def tiny(**overrides) -> lf.Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=260, n_layers=2, d_model=32, n_heads=4, max_seq_len=96, d_ff=48, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, init_std=0.2)
    return lf.Transformer(lf.ModelConfig(**base).replace(**overrides)).eval()  # another kind: the MLA sizes unset


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


class Scripted(lf.Transformer):
    """A real model (its cache advances as usual) whose logits force row b to emit scripts[b]."""

    def __init__(self, scripts: list[list[int]]) -> None:
        torch.manual_seed(0)
        super().__init__(lf.ModelConfig(vocab_size=257, n_layers=1, d_model=16, n_heads=2, max_seq_len=128, d_ff=16,
                                        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
        self.scripts, self.step = scripts, 0

    def head(self, x):  # prefill and every decode step end here, once each; x [B, (T,) d]
        logits = torch.zeros(*x.shape[:-1], 257)
        for b, script in enumerate(self.scripts):
            logits[b, ..., script[min(self.step, len(script) - 1)]] = 10.0
        self.step += 1
        return logits


def utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def record_inputs(model) -> list[torch.Tensor]:
    """Every tokens tensor the model embeds (its own forward, or the decode layer's step)."""
    calls = []
    model.embed.register_forward_pre_hook(lambda mod, args: calls.append(args[0].clone()))
    return calls


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_batched_greedy_equals_each_prompt_alone(tok, attention):
    extra = dict(attention="gqa", n_kv_heads=2) if attention == "gqa" else {}
    model = tiny(**extra)
    prompts = ["The quick brown fox", "a", "Hello, world! How are", ""]
    batched = lf.generate(model, tok, prompts, max_new_tokens=20, temperature=0)
    alone = [lf.generate(model, tok, p, max_new_tokens=20, temperature=0) for p in prompts]
    assert batched == alone
    assert all(isinstance(t, str) for t in batched)
    assert len(set(batched)) > 1  # the prompts matter


def test_prompt_prefilled_once_then_one_token_per_step(tok):
    model = tiny()
    calls = record_inputs(model)
    lf.generate(model, tok, ["abc", "defgh"], max_new_tokens=12, temperature=0)
    assert [c.shape for c in calls] == [torch.Size([2, 5])] + [torch.Size([2, 1])] * 11


def test_seed_reproducibility(tok):
    model = tiny()
    a = lf.generate(model, tok, ["Once upon", "x"], max_new_tokens=24, temperature=1.0, seed=7)
    b = lf.generate(model, tok, ["Once upon", "x"], max_new_tokens=24, temperature=1.0, seed=7)
    c = lf.generate(model, tok, ["Once upon", "x"], max_new_tokens=24, temperature=1.0, seed=8)
    assert a == b
    assert a != c


def test_eot_stops_each_row_and_ends_the_loop(tok):
    model = Scripted([utf8("hi") + [EOT] + utf8("never"), utf8("longer text") + [EOT]])
    calls = record_inputs(model)
    assert lf.generate(model, tok, ["p", "q"], max_new_tokens=20) == ["hi", "longer text"]
    assert len(calls) == len("longer text") + 1  # prefill + steps until the last row ended


def test_eot_first_gives_empty_completion(tok):
    model = Scripted([[EOT]])
    assert lf.generate(model, tok, "anything", max_new_tokens=5) == ""


def test_stop_strings_are_cut(tok):
    model = Scripted([utf8("abc STOP def"), utf8("one\ntwo\nthree")])
    out = lf.generate(model, tok, ["x", "y"], max_new_tokens=20, stop=["STOP", "\ntwo"])
    assert out == ["abc ", "one"]
    assert lf.generate(Scripted([utf8("abc STOP def")]), tok, "x", max_new_tokens=20, stop="STOP") == "abc "


def test_stop_string_on_a_real_model(tok):
    model = tiny()
    full = lf.generate(model, tok, "The", max_new_tokens=40, temperature=0)
    ascii_at = [i for i in range(5, len(full) - 2) if full[i].isascii() and full[i].isprintable() and full[i] not in full[:i]]
    assert ascii_at, full
    stop = full[ascii_at[0]]
    assert lf.generate(model, tok, "The", max_new_tokens=40, temperature=0, stop=stop) == full[:ascii_at[0]]


def test_stream_equals_non_streamed(tok):
    model = tiny()
    prompts = ["The quick", "ab", "Zürich €"]
    for kwargs in (dict(temperature=0), dict(temperature=1.0, seed=3, top_k=50), dict(temperature=0, stop=["e"])):
        full = lf.generate(model, tok, prompts, max_new_tokens=20, **kwargs)
        pieces = ["", "", ""]
        for row, text in lf.generate(model, tok, prompts, max_new_tokens=20, stream=True, **kwargs):
            assert isinstance(row, int) and text
            pieces[row] += text
        assert pieces == full
        single = list(lf.generate(model, tok, prompts[0], max_new_tokens=20, stream=True, **kwargs))
        assert all(isinstance(p, str) for p in single)
        assert "".join(single) == lf.generate(model, tok, prompts[0], max_new_tokens=20, **kwargs)


def test_stream_never_splits_a_character_or_leaks_a_stop_prefix(tok):
    model = Scripted([utf8("héllo wörld € ST ok STOP no")])
    pieces = list(lf.generate(model, tok, "x", max_new_tokens=40, stop="STOP", stream=True))
    assert "".join(pieces) == "héllo wörld € ST ok "
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5


def test_repetition_penalty_avoids_seen_tokens(tok):
    model = tiny()
    calls = record_inputs(model)
    lf.generate(model, tok, "aaaa", max_new_tokens=16, temperature=0, repetition_penalty=1e4)
    generated = [int(c[0, 0]) for c in calls[1:]]
    assert len(set(generated)) == len(generated) and ord("a") not in generated
    calls.clear()
    lf.generate(model, tok, "aaaa", max_new_tokens=16, temperature=0)
    plain = [int(c[0, 0]) for c in calls[1:]]
    assert len(set(plain)) < len(plain)  # without the penalty this model repeats itself


def test_padded_model_vocab_never_sampled(tok):
    model = tiny(vocab_size=300)
    with torch.no_grad():
        model.lm_head.weight[257:] = 5.0  # unused ids made the most likely
    out = lf.generate(model, tok, ["a", "bc"], max_new_tokens=10, temperature=1.0, seed=0)
    assert len(out) == 2  # decoding ids >= 257 would have raised


def test_cache_sized_exactly_and_in_model_dtype(tok, monkeypatch):
    model = tiny().to(torch.bfloat16)
    made = []
    original = model.make_cache
    monkeypatch.setattr(model, "make_cache", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    lf.generate(model, tok, ["abc", "abcdefg"], max_new_tokens=9, temperature=0)
    (cache,) = made
    assert cache.max_seq_len == 7 + 9
    assert all(t.dtype == torch.bfloat16 for layer in cache.layers for t in layer)


def test_truncate_keeps_the_last_prompt_tokens(tok):
    model = tiny()
    long = "x" * 50 + "The end of a long prompt"
    with pytest.raises(ValueError, match="exceeds max_seq_len=96"):
        lf.generate(model, tok, long, max_new_tokens=60)
    cut = lf.generate(model, tok, long, max_new_tokens=60, temperature=0, truncate=True)
    assert cut == lf.generate(model, tok, long[-36:], max_new_tokens=60, temperature=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=["a", 3]), "prompts must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(max_new_tokens=200), "leaves no room"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_p=0.0), "top_p must be"),
    (dict(top_p=1.5), "top_p must be"),
    (dict(top_k=-3), "top_k must be"),
    (dict(min_p=1.0), "min_p must be"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be"),
    (dict(stop=[""]), "stop must be"),
    (dict(compile=True), "compile=True needs"),
    (dict(prompts="y" * 95, max_new_tokens=2), "exceeds max_seq_len"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_is_one_line_value_error(tok, kwargs, message, stream):
    kwargs = {"prompts": "hello", **kwargs}
    with pytest.raises(ValueError, match=message) as e:
        lf.generate(tiny(), tok, stream=stream, **kwargs)  # raised at the call, also when streaming
    assert "\n" not in str(e.value)


def test_empty_prompt_starts_from_eot(tok):
    model = tiny()
    calls = record_inputs(model)
    lf.generate(model, tok, "", max_new_tokens=3, temperature=0)
    assert calls[0].tolist() == [[ByteTokenizer.eot_id]]
