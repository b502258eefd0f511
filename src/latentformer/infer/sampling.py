"""Logits processors and token sampling, vectorized over the batch.

Order (as in Hugging Face `generate`): repetition penalty, then temperature, top-k, top-p,
min-p, then a draw from the softmax (or argmax when temperature == 0). Every processor
works on fp32 logits [B, V] and removes tokens by setting them to -inf.

Temperature divides the logits after the row maximum is subtracted (softmax, top-k, top-p and
min-p do not change under a shift): the top logit stays 0, so a tiny temperature sends the others
to -inf instead of overflowing to inf - inf = NaN, and the draw tends to greedy as it should.
Temperatures below fp32's smallest normal number (`GREEDY_BELOW`) are greedy outright. Non-finite
logits (a model with NaN weights) are a ValueError, never a silent argmax over NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentformer.devices import to_device

GREEDY_BELOW = torch.finfo(torch.float32).tiny  # 1.2e-38: smaller temperatures mean greedy decoding
FLOAT32_MAX = torch.finfo(torch.float32).max  # 3.4e38: sampling runs in fp32, larger values are inf there


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """ValueError unless `temperature` is a number in [0, FLOAT32_MAX] (0 = greedy)."""
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 <= temperature <= FLOAT32_MAX):
        raise ValueError(f"{name} must be a number in [0, {FLOAT32_MAX:.3g}] (0 = greedy), got {temperature!r}")


def check_top_p(top_p: float, name: str = "top_p") -> None:
    """ValueError unless `top_p` is in [GREEDY_BELOW, 1]: a smaller p is 0 in float32, which keeps no token."""
    if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and GREEDY_BELOW <= top_p <= 1):
        raise ValueError(f"{name} must be in [{GREEDY_BELOW:.3g}, 1] (1 = off; smaller values are 0 in float32), got {top_p!r}")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        check_top_p(self.top_p)
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= FLOAT32_MAX):
            raise ValueError(f"repetition_penalty must be in (0, {FLOAT32_MAX:.3g}] (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019) as in HF: for tokens already in the row (seen [B, V] bool),
    positive logits are divided by `penalty`, negative ones multiplied by it."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability reaches p; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    remove_sorted = before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """min-p (Nguyen et al. 2024): remove tokens whose probability is below p x the top probability."""
    if p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = p * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def top_p_rows(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`top_p` with one p per row (p [B, 1]); rows with p >= 1 are left exactly as they are."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    remove_sorted = (probs.cumsum(-1) - probs >= p) & (p < 1)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def check_finite(logits: torch.Tensor) -> None:
    """ValueError when the model's logits hold NaN or inf (one reduction, one host sync per step)."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model produced non-finite logits (NaN or inf): its weights or activations are not finite "
                         "(a diverged run, or a float16 overflow: try --dtype float32)")


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> processed fp32 logits [B, V] (the distribution sampled from)."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature  # stable at any temperature
    logits = top_k(logits, params.top_k)
    logits = top_p(logits, params.top_p)
    return min_p(logits, params.min_p)


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: logits [B, V] -> ids [B] (argmax when greedy)."""
    check_finite(logits)
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def sample_rows(logits: torch.Tensor, temperature: list[float], top_p: list[float],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row with per-row settings (a continuous batch): logits [B, V] -> ids [B].

    Row b is greedy when temperature[b] < GREEDY_BELOW (0 included), else it draws from softmax(logits / temperature[b])
    cut to top_p[b], with its own `generators[b]` (None: the global generator). A row's draw uses
    only its own logits and generator, so a seeded row gives the same tokens whatever else is in
    the batch, and the same as `sample` on that row alone. A row whose logits or distribution are
    not finite (a diverged model; settings that leave no token) gets -1 instead of a token, with no
    host sync and no effect on the other rows (`multinomial` never sees it: on CUDA a NaN there is
    a device-side assert that ends the process's CUDA context)."""
    logits = logits.float()
    ok = torch.isfinite(logits).all(-1)  # [B]
    out = logits.argmax(-1)
    drawn = [b for b, t in enumerate(temperature) if t >= GREEDY_BELOW]
    if drawn:
        idx = to_device(drawn, logits.device, torch.long)
        t = to_device([temperature[b] for b in drawn], logits.device, torch.float32)[:, None]
        p = to_device([top_p[b] for b in drawn], logits.device, torch.float32)[:, None]
        rows = logits[idx]
        probs = top_p_rows((rows - rows.amax(-1, keepdim=True)) / t, p).softmax(-1)  # [len(drawn), V], stable as in `sample`
        finite = torch.isfinite(probs).all(-1)
        probs = torch.where(finite[:, None], probs, 1.0)
        shared = [i for i, b in enumerate(drawn) if generators[b] is None]
        picks = torch.empty(len(drawn), dtype=torch.long, device=logits.device)
        if shared:
            where = to_device(shared, logits.device, torch.long)
            picks[where] = torch.multinomial(probs[where], 1)[:, 0]
        for i, b in enumerate(drawn):
            if generators[b] is not None:
                picks[i] = torch.multinomial(probs[i:i + 1], 1, generator=generators[b])[0, 0]
        out[idx] = picks
        ok[idx] = ok[idx] & finite
    return torch.where(ok, out, -1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities for the rows `rows` of logits [B, V] and their sampled `tokens` [B] (-1:
    failed, read as id 0): the model's own distribution, log_softmax of the raw logits before
    temperature and top_p (vLLM's default "raw_logprobs"; OpenAI reports no other). Returns
    (values [R, 1 + k] fp32: the chosen token's, then the top k in descending order; ids [R, k]).
    All on the device, no host sync: the caller copies them back with the tokens."""
    idx = to_device(rows, logits.device, torch.long)
    lp = logits[idx].float().log_softmax(-1)  # [R, V]
    chosen = lp.gather(1, tokens[idx].clamp(min=0)[:, None])  # [R, 1]
    top = lp.topk(k, dim=-1)  # [R, k] each
    return torch.cat([chosen, top.values], 1), top.indices
