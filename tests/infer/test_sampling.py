"""Logits processors: hand-computed distributions and Hugging Face's processors as oracles."""

from __future__ import annotations

import math

import pytest
import torch

from latentformer.infer.sampling import SamplingParams, process_logits, sample, token_logprobs

PROBS = [0.5, 0.3, 0.1, 0.06, 0.04]


def hand_logits() -> torch.Tensor:
    return torch.tensor([PROBS]).log()  # [1, 5]


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero()[:, 0].tolist()


def test_min_p_keeps_tokens_above_fraction_of_top_probability():
    out = process_logits(hand_logits(), SamplingParams(min_p=0.15))  # threshold 0.15 * 0.5 = 0.075
    assert kept(out) == [0, 1, 2]
    assert torch.allclose(out.softmax(-1)[0, :3], torch.tensor(PROBS[:3]) / 0.9)
    assert kept(process_logits(hand_logits(), SamplingParams(min_p=0.5))) == [0, 1]  # 0.25: 0.3 stays


@pytest.mark.parametrize("p, expect", [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_smallest_nucleus(p, expect):
    shuffled = torch.tensor([[2, 4, 0, 1, 3]])
    logits = hand_logits()[:, shuffled[0]]  # order must not matter
    out = process_logits(logits, SamplingParams(top_p=p))
    assert sorted(shuffled[0, kept(out)].tolist()) == expect


def test_top_k_and_temperature():
    out = process_logits(hand_logits(), SamplingParams(top_k=2, temperature=0.5))
    assert kept(out) == [0, 1]
    scaled = hand_logits()[0, :2] / 0.5  # up to the shift by the row maximum, which no distribution sees
    assert torch.allclose(out[0, :2], scaled - scaled.max())


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]


def test_matches_hugging_face_processors():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    seen_ids = torch.randint(0, 50, (4, 7))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter(1, seen_ids, True)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    hf = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.3),
        transformers.TemperatureLogitsWarper(0.7),
        transformers.TopKLogitsWarper(20),
        transformers.TopPLogitsWarper(0.9),
        transformers.MinPLogitsWarper(0.05),
    ])(seen_ids, logits.clone())
    ours = process_logits(logits, params, seen)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(hf))
    assert torch.allclose(ours.softmax(-1), hf.softmax(-1), atol=1e-6)


def test_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    greedy = sample(logits, SamplingParams(temperature=0))
    assert torch.equal(greedy, logits.argmax(-1))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, SamplingParams(top_k=1), generator=gen), greedy)
    assert torch.equal(sample(logits, SamplingParams(top_p=1e-6), generator=gen), greedy)


def test_sampling_follows_the_distribution():
    gen = torch.Generator().manual_seed(0)
    draws = sample(hand_logits().expand(20000, 5), SamplingParams(), generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.015)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.1), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
])
def test_bad_parameters(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-30, 1e-8])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    torch.manual_seed(2)
    logits = torch.randn(4, 50) * 5
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=temperature, top_p=0.9, min_p=0.05)
    assert torch.equal(sample(logits, params, generator=gen), logits.argmax(-1))
    probs = process_logits(logits, params).softmax(-1)
    assert torch.isfinite(probs).all() and torch.equal(probs.argmax(-1), logits.argmax(-1))


def test_tiny_temperature_keeps_ties():
    logits = torch.tensor([[30.0, 30.0, -1.0]])  # 30 / 2e-38 overflows fp32 when divided unshifted
    probs = process_logits(logits, SamplingParams(temperature=2e-38)).softmax(-1)
    assert probs.tolist() == [[0.5, 0.5, 0.0]]  # the limit of softmax(l / t) as t -> 0


@pytest.mark.parametrize("temperature", [0, 0.7])
def test_non_finite_logits_are_an_error(temperature):
    logits = torch.randn(2, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits"):
        sample(logits, SamplingParams(temperature=temperature))


def test_token_logprobs_are_the_raw_log_softmax_of_the_asking_rows():
    """For the rows asked only: the log_softmax of the raw logits (no temperature, no top_p) at the
    chosen token, then the true top k in descending order with their ids; a failed row (-1) reads id 0."""
    torch.manual_seed(0)
    logits = torch.randn(4, 30) * 3
    tokens = torch.tensor([5, 7, -1, 2])
    values, ids = token_logprobs(logits, tokens, [1, 2, 3], k=4)
    lp = logits.log_softmax(-1)
    assert values.shape == (3, 5) and ids.shape == (3, 4)
    for r, b in enumerate([1, 2, 3]):
        assert math.isclose(values[r, 0], lp[b, max(0, int(tokens[b]))], abs_tol=1e-6)
        top = lp[b].sort(descending=True)
        assert ids[r].tolist() == top.indices[:4].tolist()
        assert torch.allclose(values[r, 1:], top.values[:4], atol=1e-6)
    values, ids = token_logprobs(logits, tokens, [0], k=0)  # the chosen token only
    assert values.shape == (1, 1) and ids.shape == (1, 0) and math.isclose(values[0, 0], lp[0, 5], abs_tol=1e-6)

