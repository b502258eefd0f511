"""KV-cache oracles: incremental decoding reproduces the full forward, for every attention kind
and positional option; cached keys are written once and never re-rotated; MLA absorbed decode
form == expanded form; allocated bytes == the accounting formula; left padding == unpadded rows."""

from __future__ import annotations

import itertools

import pytest
import torch

from latentformer import Transformer
from latentformer.model.attention import MLA

from .helpers import ATTENTION, FFNS, NORMS, POSITIONS, small

PROMPT, CHUNK, STEPS = 10, 7, 52  # prefill, one multi-token chunk, then 50+ one-token steps
TOTAL = PROMPT + CHUNK + STEPS
MAX_LEN = 80

CASES = {f"{a}|{p}": {**av, **pv} for (a, av), (p, pv) in itertools.product(ATTENTION.items(), POSITIONS.items())}
CASES["mla|rope|moe"] = {**ATTENTION["mla"], **FFNS["moe"]}
CASES["gqa|rope|moe"] = {**ATTENTION["gqa"], **FFNS["moe"]}
CASES["mla|rope|post-ln"] = {**ATTENTION["mla"], **NORMS["post-ln"]}
CASES["mha|learned|post-ln"] = {**ATTENTION["mha"], **POSITIONS["learned"], **NORMS["post-ln"]}


def build(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # init_std 0.2: attention far from uniform, so a wrong position or key changes the logits a lot
    return Transformer(small(max_seq_len=MAX_LEN, init_std=0.2, **overrides)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def incremental(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Logits of `tokens` [B, TOTAL] computed as prefill + chunk + single steps through one cache."""
    cache = model.make_cache(tokens.shape[0], MAX_LEN)
    out = [model(tokens[:, :PROMPT], cache=cache), model(tokens[:, PROMPT:PROMPT + CHUNK], cache=cache)]
    for t in range(PROMPT + CHUNK, TOTAL):
        out.append(model(tokens[:, t:t + 1], cache=cache))
    assert cache.pos == TOTAL
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("name", list(CASES))
def test_incremental_equals_full_forward(name):
    model = build(**CASES[name])
    tokens = torch.randint(0, 97, (2, TOTAL))
    with torch.no_grad():
        full = model(tokens)
    inc, _ = incremental(model, tokens)
    assert inc.shape == full.shape
    assert rel_err(inc, full) < 1e-4
    # the oracle can fail: logits depend on position, so shifted tokens give different logits
    with torch.no_grad():
        shifted = model(torch.cat((tokens[:, :1], tokens[:, :-1]), dim=1))
    assert rel_err(shifted[:, PROMPT:], full[:, PROMPT:]) > 1e-2


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("mla")])
def test_mla_absorbed_form_equals_expanded(name, padded):
    """MLA.absorbed (attention over the cached latent, W_UK/W_UV applied per step) == the expanded
    form on the same cache, for a one-token step and a multi-token chunk, with left padding."""
    model = build(**CASES[name])
    tokens = torch.randint(0, 97, (2, PROMPT + CHUNK + 1))
    forms = {"expanded": MLA.forward, "absorbed": MLA.absorbed}
    outs = {}
    with torch.no_grad():
        for form, attend in forms.items():
            cache = model.make_cache(2, MAX_LEN)
            if padded:
                cache.set_left_padding([3, 0])
            model(tokens[:, :PROMPT], cache=cache)  # prefill: the expanded form
            attn = model.layers[0].attn
            out = []
            for chunk in (tokens[:, PROMPT:PROMPT + CHUNK], tokens[:, PROMPT + CHUNK:]):
                x, ctx = model.context(chunk, cache)
                out.append(attend(attn, model.layers[0].attn_norm(x), ctx, cache.layers[0]))
                cache.advance(chunk.shape[1])
            outs[form] = torch.cat(out, 1)
    assert rel_err(outs["absorbed"], outs["expanded"]) < 1e-5


def slots(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Cache slots a..b of a buffer: [B, Hk, S, D] (K/V) or [B, S, r + dr] (MLA latent)."""
    return t[:, :, a:b] if t.dim() == 4 else t[:, a:b]


@pytest.mark.parametrize("name", ["mha|rope", "gqa|rope-interleave", "mqa|yarn", "mla|yarn", "mla-q|sinusoid+rope"])
def test_cached_keys_are_written_once_never_rerotated(name):
    model = build(**CASES[name])
    tokens = torch.randint(0, 97, (1, TOTAL))
    with torch.no_grad():
        cache = model.make_cache(1, MAX_LEN)
        model(tokens[:, :PROMPT], cache=cache)
        after_prefill = [[slots(t, 0, PROMPT).clone() for t in layer] for layer in cache.layers]
        model(tokens[:, PROMPT:PROMPT + CHUNK], cache=cache)
        for t in range(PROMPT + CHUNK, TOTAL):
            model(tokens[:, t:t + 1], cache=cache)
        # one prefill of the whole sequence: every slot computed once, at its own position
        reference = model.make_cache(1, MAX_LEN)
        model(tokens, cache=reference)
        # the same tokens one position later: layer-0 keys differ, so the comparison can fail
        later = model.make_cache(1, MAX_LEN)
        model(torch.cat((tokens[:, :1], tokens), dim=1)[:, :TOTAL], cache=later)
    for layer, ref, early in zip(cache.layers, reference.layers, after_prefill):
        for t, r, e in zip(layer, ref, early):
            assert rel_err(slots(t, 0, TOTAL), slots(r, 0, TOTAL)) < 1e-5
            assert torch.equal(slots(t, 0, PROMPT), e)  # 59 more tokens left the prompt's slots untouched
    k0, k0_later = cache.layers[0][0], later.layers[0][0]
    assert rel_err(slots(k0, 0, PROMPT), slots(k0_later, 1, PROMPT + 1)) > 1e-2


@pytest.mark.parametrize("kind", list(ATTENTION))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_as_allocated(kind, dtype):
    model = build(**ATTENTION[kind])
    cfg = model.config
    batch, seq = 3, 40
    cache = model.make_cache(batch, seq, dtype=dtype)
    assert all(t.dtype == dtype for layer in cache.layers for t in layer)
    per_token = model.kv_cache_bytes_per_token(dtype)
    assert cache.nbytes == per_token * seq * batch
    # closed form (DeepSeek-V2 §2.1.3): MLA caches r + dr values per layer, MHA-family 2 * Hk * D
    values = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attention == "mla" else 2 * cfg.n_kv_heads * cfg.head_dim
    assert per_token == values * cfg.n_layers * dtype.itemsize


@pytest.mark.parametrize("name", ["mha|rope", "gqa|learned", "mqa|sinusoid+rope", "mla|rope-interleave", "mla-q|yarn", "mla|learned"])
def test_left_padded_batch_equals_unpadded_rows(name):
    model = build(**CASES[name])
    lengths, steps = [12, 7, 3], 10
    L = max(lengths)
    rows = [torch.randint(0, 97, (n + steps,)) for n in lengths]
    prompt = torch.randint(0, 97, (len(rows), L))  # padding slots hold garbage: they must not matter
    for b, (row, n) in enumerate(zip(rows, lengths)):
        prompt[b, L - n:] = row[:n]
    with torch.no_grad():
        cache = model.make_cache(len(rows), L + steps)
        cache.set_left_padding([L - n for n in lengths])
        outs = [model(prompt, cache=cache)]
        for s in range(steps):
            step = torch.stack([row[n + s] for row, n in zip(rows, lengths)])[:, None]
            outs.append(model(step, cache=cache))
        batched = torch.cat(outs, dim=1)  # [B, L + steps, V]
        for b, (row, n) in enumerate(zip(rows, lengths)):
            alone = model(row[None])[0]  # [n + steps, V]
            assert rel_err(batched[b, L - n:], alone) < 1e-4, f"row {b}"
