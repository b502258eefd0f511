"""RowText: incremental detokenization against the whole-row decode, for byte-level BPE (GPT-2),
bytes, and a SentencePiece-style tokenizer (leading-space marker, byte fallback)."""

from __future__ import annotations

import random

import pytest

from latentformer.data.tokenizer import load_tokenizer
from latentformer.infer.detokenize import REPLACEMENT, RowText


class Counting:
    """A tokenizer wrapper that counts the ids decoded (the cost of detokenizing); it has no
    `byte_decoder`, so RowText takes its window path whatever the tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.inner, self.decoded = tokenizer, 0
        self.stop_ids = frozenset()

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids)


def sentencepiece_like():
    """A Llama-style tokenizer: '▁' for spaces, the first piece's space stripped, byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)],
                                  show_progress=False)
    tk.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "hello world"] * 20, trainer=trainer)

    class SP:
        vocab_size = tk.get_vocab_size()
        stop_ids = frozenset()

        def decode(self, ids):
            return tk.decode(ids, skip_special_tokens=False)

        def encode(self, text):
            return tk.encode(text).ids

    return SP()


TOKENIZERS = {"gpt2": lambda: load_tokenizer("gpt2"), "byte": lambda: load_tokenizer("byte"),
              "sentencepiece": sentencepiece_like}
TEXT = "The cat sat on the mat. Zürich € 北京 — ok?\n  hello world  a dog 🙂 end"


def sequences(tok, rng: random.Random, first_random_id: int) -> list[list[int]]:
    """Real text (multi-byte characters split across tokens) and random ids (invalid UTF-8 too)."""
    vocab = min(tok.vocab_size, 50257)
    stop = getattr(tok, "eot_id", None)  # the end of a row, not part of its text
    randoms = [[i for i in (rng.randrange(first_random_id, vocab) for _ in range(60)) if i != stop] for _ in range(20)]
    return [tok.encode(TEXT), tok.encode("🙂🙂 €€ 北京北京")] + randoms


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_pieces_concatenate_to_the_whole_decode(name):
    tok = TOKENIZERS[name]()
    # byte-fallback decoders replace each byte of an invalid UTF-8 run, so how random byte tokens
    # decode depends on their neighbours: random ids there are drawn from the merged pieces only
    first = 257 if name == "sentencepiece" else 1
    for ids in sequences(tok, random.Random(0), first):
        counting = Counting(tok)
        for row in (RowText(counting, [], incremental=True), RowText(tok, [], incremental=True)):
            pieces = [row.push(t) for t in ids] + [row.finish()]
            assert "".join(pieces) == row.text == tok.decode(ids)
            if REPLACEMENT not in tok.decode(ids):  # valid UTF-8: no piece ever ends inside a character
                assert all(REPLACEMENT not in p for p in pieces)
        # cost: each token decodes a window of a few ids, not the whole row (O(n), not O(n^2))
        assert counting.decoded <= 8 * len(ids) + 8


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_string_cuts_the_text_where_it_starts(name):
    tok = TOKENIZERS[name]()
    ids = tok.encode(TEXT)
    full = tok.decode(ids)
    for stop in ("mat", "€", "world", " a dog", "end", "not there"):
        for incremental, wrap in ((True, Counting), (False, Counting), (True, lambda t: t), (False, lambda t: t)):
            row = RowText(wrap(tok), [stop], incremental)
            pieces = []
            for t in ids:
                pieces.append(row.push(t))
                if row.done:
                    break
            pieces.append(row.finish())
            expected = full[:full.find(stop)] if stop in full else full
            assert row.text == expected and "".join(pieces) == expected, (stop, incremental)
            assert all(stop not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_no_piece_leaks_a_stop_prefix():
    tok = load_tokenizer("byte")
    row = RowText(tok, ["STOP"], incremental=True)
    out = ""
    for t in "ok ST and STO then STOP after".encode():
        piece = row.push(t)
        out += piece
        assert not out.endswith(("S", "ST", "STO")) or row.done
        if row.done:
            break
    assert out + row.finish() == "ok ST and STO then "


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_byte_level_tokenizers_take_the_byte_path(name):
    """The byte path (one lookup per token) is taken where decode is the joined bytes' UTF-8."""
    tok = TOKENIZERS[name]()
    assert RowText(tok, [], incremental=True).utf8 is not None
    ids = tok.encode("北京") + [tok.eot_id]
    assert b"".join(map(tok.byte_decoder(), ids)).decode("utf-8", "replace") == tok.decode(ids)


def test_stop_id_ends_the_row_and_non_streamed_text_comes_at_finish():
    tok = load_tokenizer("gpt2")
    ids = tok.encode("hello world")
    row = RowText(tok, [], incremental=False)
    assert [row.push(t) for t in ids] == ["", ""]
    assert row.push(tok.eot_id) == "hello world" and row.done
    assert row.push(ids[0]) == "" and row.finish() == ""
