"""Incremental detokenization: one generated row's token ids in, safe text increments out.

Decoding the whole row at every token costs O(n) per token, O(n^2) per completion: at a
serving batch of 64 rows and a few hundred tokens that is as much host time per step as the
GPU's decode step. Instead:

- byte-level tokenizers (`Tokenizer.byte_decoder()`: GPT-2, the BPEs trained here, bytes) feed
  each token's bytes to an incremental UTF-8 decoder, which holds back an incomplete character
  and gives exactly the text of decoding all the bytes at once;
- the others decode a short window per token (the approach of Hugging Face's `TextStreamer` and
  vLLM's detokenizer): `ids[prefix:read]` were already turned into text, and the new text is
  `decode(ids[prefix:]) - decode(ids[prefix:read])`. The window keeps left context because a
  tokenizer's decode of a suffix can differ at its start (SentencePiece drops the leading space
  of the first piece). While the window's text ends in an incomplete UTF-8 sequence (U+FFFD)
  nothing is taken: the next token may complete the character.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """id -> that token's own bytes (for logprobs): exact for byte-level tokenizers (`byte_decoder`),
    else the UTF-8 of the token decoded alone."""
    exact = tokenizer.byte_decoder() if hasattr(tokenizer, "byte_decoder") else None
    return exact if exact is not None else lambda token: tokenizer.decode([token]).encode()


class RowText:
    """The completion of one row as text.

    `push(token)` returns the new text that is safe to hand out (may be ""): it never ends in a
    replacement character or in a prefix of a stop string, so streamed pieces concatenate to the
    final text. A stop id ends the row; a stop string ends it too and is cut from the text.
    `incremental=False` (no streaming): nothing is handed out before `finish()`, and without stop
    strings the text is decoded once, at the end.
    """

    def __init__(self, tokenizer, stops: list[str], incremental: bool) -> None:
        self.tokenizer, self.stops, self.incremental = tokenizer, stops, incremental
        self.stop_ids = tokenizer.stop_ids
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read] (cut at a stop string once one is found)
        self.prefix = 0  # ids[prefix:read]: left context for decoding the next tokens
        self.read = 0
        self.emitted = 0  # characters of `text` already handed out
        self.cut = False  # a stop string ended the text: nothing after it is decoded
        self.done = False
        self.token_bytes = tokenizer.byte_decoder() if hasattr(tokenizer, "byte_decoder") else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if self.token_bytes else None

    def push(self, token: int) -> str:
        """Add one generated token; returns the new safe text (may be "")."""
        if token in self.stop_ids:
            return self.finish()
        self.ids.append(token)
        if not (self.stops or self.incremental):
            return ""
        if self._advance(final=False):
            return self.finish()
        if not self.incremental:
            return ""
        safe = len(self.text) - self._stop_prefix_len()
        piece, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
        return piece

    def _advance(self, final: bool) -> bool:
        """Append the text of ids[read:] once it is whole (or, `final`, as it is); True when a
        stop string is found in the text (which is then cut where it starts)."""
        if self.cut or (self.read == len(self.ids) and not (final and self.utf8)):
            return False
        if self.utf8 is not None:
            new = self.utf8.decode(b"".join(map(self.token_bytes, self.ids[self.read:])), final)
            self.read = len(self.ids)
        else:
            decode = self.tokenizer.decode
            context = decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
            window = decode(self.ids[self.prefix:])
            if not (final or (len(window) > len(context) and not window.endswith(REPLACEMENT))):
                return False
            new = window[len(context):]
            self.prefix, self.read = self.read, len(self.ids)
        before = len(self.text)
        self.text += new
        # a stop string that was not in the old text ends in the new part
        hits = [i for i in (self.text.find(s, max(0, before - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.cut = self.text[:min(hits)], True
        return self.cut

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of `text` that begins some stop string (held back)."""
        for n in range(min(self.longest_stop - 1, len(self.text) - self.emitted), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stops):
                return n
        return 0

    def finish(self) -> str:
        """End the row; returns the text not yet emitted."""
        if self.done:
            return ""
        self.done = True
        if not (self.stops or self.incremental):
            self.text = self.tokenizer.decode(self.ids)
        else:
            self._advance(final=True)  # the tokens of an incomplete last character, as they decode
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece
