"""Batched, streaming text generation with a preallocated KV cache.

Prompts of different lengths are left-padded into one batch (`KVCache.set_left_padding`),
prefilled once, then decoded one token per step: the prompt is never recomputed. A row ends
at one of the tokenizer's `stop_ids` (end-of-text) or at a stop string; finished rows stay in the batch (the cache keeps static
shapes) but their tokens are discarded, and the loop ends when every row has finished.
An empty prompt starts from the end-of-text token, which acts as beginning-of-sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from latentformer.infer.cuda_graph import decode_step
from latentformer.infer.detokenize import RowText
from latentformer.infer.prefill import prefill_attention
from latentformer.infer.sampling import SamplingParams, sample
from latentformer.model.transformer import Transformer


def generate(model: Transformer, tokenizer, prompts: str | list[str], max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None,
             stream: bool = False, truncate: bool = False, compile: bool = False):
    """Complete `prompts` (a str -> a str; a list -> a list, same order), without the prompt text.

    temperature 0 is greedy; `seed` makes sampling reproducible; `stop` strings end a row and
    are cut from its text. `truncate=True` keeps the last tokens of a prompt too long for
    `max_new_tokens` within the model's max_seq_len (else ValueError). `compile=True` (CUDA only)
    fuses the one-token decode step with torch.compile and replays it as a CUDA graph
    (`latentformer.infer.cuda_graph.GraphDecodeStep`); the prefill runs eagerly. Decoding goes
    through the decode layer (`latentformer.infer.decode.Decoder`, absorbed MLA).
    stream=True returns an iterator of text increments: str for a single prompt, (row, str)
    for a list; the increments of a row concatenate to the text returned without streaming.
    Argument errors raise ValueError at the call, also when streaming.
    """
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts) if isinstance(prompts, (list, tuple)) else None
    if batch is None or not all(isinstance(p, str) for p in batch):
        raise ValueError("prompts must be a string or a list of strings")
    if not batch:
        raise ValueError("prompts is empty: give at least one prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    device = next(model.parameters()).device
    if compile and device.type != "cuda":
        raise ValueError("compile=True needs a model on a CUDA device")
    ids = [fit_prompt(tokenizer.encode(p) or [tokenizer.eot_id], max_new_tokens, model.config.max_seq_len, truncate, i)
           for i, p in enumerate(batch)]

    events = _decode(model, tokenizer, ids, max_new_tokens, params, seed, stops, stream, compile)
    if stream:
        return (text for _, text in events) if single else events
    texts = [""] * len(batch)
    for row, text in events:
        texts[row] += text
    return texts[0] if single else texts


class PromptTooLong(ValueError):
    """A prompt that does not fit the context with `max_new_tokens` after it. The message names the
    Python arguments; `worded(...)` names a caller's own (the CLI's flags)."""

    def __init__(self, index: int, n_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
        self.index, self.n_tokens, self.max_new_tokens, self.max_seq_len = index, n_tokens, max_new_tokens, max_seq_len
        super().__init__(self.worded("max_new_tokens={}", "truncate=True"))

    def worded(self, max_new_tokens: str, truncate: str) -> str:
        """The message with `max_new_tokens` (a format with one {} for the value) and `truncate` as the
        caller names them."""
        new, room = max_new_tokens.format(self.max_new_tokens), self.max_seq_len - self.max_new_tokens
        if room < 1:
            return f"{new} leaves no room for a prompt within max_seq_len={self.max_seq_len}"
        return (f"prompt {self.index} has {self.n_tokens} tokens; with {new} that exceeds max_seq_len={self.max_seq_len} "
                f"(shorten it or pass {truncate} to keep its last {room} tokens)")


def fit_prompt(ids: list[int], max_new_tokens: int, max_seq_len: int, truncate: bool, index: int = 0) -> list[int]:
    """The prompt's ids, checked (or, with `truncate`, cut from the left) so that prompt +
    max_new_tokens fits the model's context; PromptTooLong otherwise."""
    room = max_seq_len - max_new_tokens
    if len(ids) <= room:
        return ids
    if truncate and room >= 1:
        return ids[-room:]
    raise PromptTooLong(index, len(ids), max_new_tokens, max_seq_len)


@torch.inference_mode()
def _decode(model: Transformer, tokenizer, ids: list[list[int]], max_new_tokens: int, params: SamplingParams,
            seed: int | None, stops: list[str], incremental: bool, compile: bool) -> Iterator[tuple[int, str]]:
    """Prefill once, then one token per step; yields (row, text increment)."""
    device = next(model.parameters()).device
    B, L = len(ids), max(len(r) for r in ids)
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)  # padded model vocab: never sample unused ids
    cache = model.make_cache(B, L + max_new_tokens)
    cache.set_left_padding([L - len(r) for r in ids])
    tokens = torch.full((B, L), tokenizer.eot_id, dtype=torch.long, device=device)
    for b, r in enumerate(ids):
        tokens[b, L - len(r):] = torch.tensor(r, dtype=torch.long)
    seen = None
    if params.repetition_penalty != 1.0:  # tokens of the row so far: prompt (not its padding) + generated
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        for b, r in enumerate(ids):
            seen[b, torch.tensor(r, device=device).clamp(max=vocab - 1)] = True
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    rows = [RowText(tokenizer, stops, incremental) for _ in ids]
    with prefill_attention():
        logits = model.next_token_logits(tokens, cache)[:, :vocab]  # [B, V]
    step = decode_step(model, cache, compile and max_new_tokens > 1)  # consumed before the next call
    for i in range(max_new_tokens):
        nxt = sample(logits, params, seen, generator)  # [B]
        for b, token in enumerate(nxt.tolist()):
            if not rows[b].done:
                piece = rows[b].push(token)
                if piece:
                    yield b, piece
        if all(r.done for r in rows) or i == max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(B, device=device), nxt] = True
        logits = step(nxt[:, None])[:, -1, :vocab]
    for b, row in enumerate(rows):
        piece = row.finish()
        if piece:
            yield b, piece
