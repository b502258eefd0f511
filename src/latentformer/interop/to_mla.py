"""A pretrained MHA/GQA checkpoint -> an MLA one (the TransMLA / MHA2MLA line of work: Meng et al.
2025, "TransMLA: Multi-Head Latent Attention Is All You Need"; Ji et al. 2025, "Towards Economical
Inference: Enabling DeepSeek's Multi-Head Latent Attention in Any Transformer-based LLMs"). Our own
derivation, per layer, from calibration statistics; what was measured against what: NOTES.md.

Legend: H query heads, G key/value heads, D head_dim, d d_model, group g(h) = h // (H/G); dr the
MLA rope dims (n = dr/2 frequency pairs), r = kv_lora_rank; Sigma = sum over calibration tokens of
x x^T (x: the attention's input, after its norm); p_h(s) = the source head h's attention weight on
the key s tokens back, summed over the calibration's queries (`LayerStats.lag`). Pair f of a head:
dims (f, f + D/2), or (2f, 2f+1) when interleaved (rope.apply_rope's layouts); its frequency falls
as f grows.

1. Partial RoPE. MLA rotates one key shared by all heads (k_pe, dr dims). It keeps the n
   highest-frequency pairs f < n at the source's own frequencies: MLA's rope of dim dr with
   rope_theta' = rope_theta^(dr/D) has exactly the source's first n frequencies (checked). The other
   pairs lose their rotation (approximation 1): nearly free for the low frequencies, which turn
   little across a context. (MHA2MLA's S_2-norm choice of pairs, and choices per layer, measured worse.)
2. Rope merge, query-weighted (TransMLA's RoRoPE generalized). Per kept pair f: k_pe,f = sum_g a_g
   k_{g,f}, and head h's pair-f score q_h . R k_g becomes beta_g q_h . R k_pe (rotated, exact) +
   q_h . (k_g - beta_g k_pe) (the residual, unrotated: approximation 1 again). beta is the
   least-squares coefficient (C a) / (a^T C a); a maximizes the query-weighted key energy kept in
   the rotated part, sum_g Q_g (C a)_g^2 / a^T C a (a generalized eigenproblem), with C the G x G
   covariance of the pair's pre-RoPE keys and Q_g the query energy of group g's heads on the pair
   (both components of the pair pooled). Equal Q_g gives RoRoPE's top eigenvector of C. Exact when
   every KV head's keys are equal.
3. Non-rope key: head h scores its own query q_h (D dims, qk_nope_head_dim = D) against its group's
   residual key kappa_g: the residual on the kept pairs, the whole key on the others. On a kept
   pair the residual loses its rotation, so the query's pair f is turned by the rotation it had on
   average where head h attends (approximation 1, made smaller): the source scores q . R(-w_f s) k
   at distance s, and with A_hf = sum_s p_h(s) R(-w_f s), p_h the source head's attention weight at
   distance s over the calibration's queries (normalized), the unrotated term becomes
   (A_hf^T q) . kappa. A pair that turns fast where the head attends shrinks towards its mean; a head
   that attends to its own token keeps the identity. The dropped pairs keep the identity: turned
   the same way they measured worse (NOTES.md).
4. Joint latent. y = [kappa_0..kappa_{G-1}; v_0..v_{G-1}] (2GD values) is compressed to r by a PCA
   of its calibration covariance W_y Sigma W_y^T in an output-aware metric M: a key error e costs
   (q_h . e)^2 (block sum_{h in g} W_q,h Sigma W_q,h^T), a value error |W_o,h e|^2 (block
   sum_{h in g} W_o,h^T W_o,h), the key blocks scaled so both carry equal total weighted variance
   (TransMLA's balanced K/V, in this metric). With U the top-r eigenvectors of
   M^1/2 W_y Sigma W_y^T M^1/2: kv_a_proj's latent rows = U^T M^1/2 W_y, kv_b_proj = M^-1/2 U per
   head (its group's rows). Exact at r = rank(W_y Sigma W_y^T) (<= min(d, 2GD)).
5. No latent norm (kv_latent_norm false): MLA's RMSNorm would rescale each token's latent by its own
   RMS, which no choice of weights undoes; the source's keys and values never had it.
6. The source's softmax scale over MLA's (1/sqrt(D) vs 1/sqrt(D + dr), YaRN's mscale included) is
   folded into the query weights, so kept scores are unchanged.
Everything else (embeddings, norms, FFN/MoE, o_proj, output layer) is copied unchanged.

Calibration: Sigma and p_h from the source's own activations (default), or sequential (`sequential=True`,
as GPTQ / SparseGPT): layer i's statistics from the inputs it sees in the model whose layers < i are
already converted, so its latent is fitted to the activations it will actually get. Measured on
SmolLM2 (NOTES.md): 0% / 7% lower perplexity at 25% of its cache, 3% / 1% at 50%; an option (it
costs a second forward over the calibration per conversion).

Sizes: by rank (`--kv-lora-rank`) or by a fraction of the source's KV cache (`--kv-fraction`); the
rope dims default to a third of the cache per token and layer (half the rank), at most D: measured
best on SmolLM2 at 50% and 25% of its cache (NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from latentformer.config import ModelConfig
from latentformer.infer.cuda_graph import GraphDecodeStep
from latentformer.infer.decode import Decoder
from latentformer.model.rope import apply_rope, rope_inv_freq
from latentformer.model.transformer import Transformer

Progress = Callable[[int, int], None]  # (done, total) of a phase
SAMPLES = "samples"  # --calib part: text sampled from the source model itself
# relative floor of the eigenvalues inverted (metric blocks, rope-merge covariances): directions
# weaker than this carry no signal and are not amplified
FLOOR = 1e-10


class _Stop(Exception):
    """Ends a calibration forward once the attention input it needs is seen."""


def check_source(cfg: ModelConfig) -> None:
    """ValueError (one line) when `cfg` cannot become MLA at all."""
    if cfg.attention == "mla":
        raise ValueError("the source is already an MLA model (attention: mla)")
    if cfg.attention not in ("mha", "gqa", "mqa"):
        raise ValueError(f"the source's attention is {cfg.attention}: the conversion maps the key/value heads of mha/gqa/mqa")
    if not cfg.rope:
        raise ValueError("the source has no rotary positions (rope: false): the conversion needs full RoPE")
    if cfg.n_kv_heads == 1:
        raise ValueError("an MQA source (n_kv_heads = 1) is not supported: the conversion is made and measured for several KV heads")
    if cfg.qkv_bias:
        raise ValueError("the source has q/k/v biases (qkv_bias), which MLA cannot express")


def max_rank(cfg: ModelConfig) -> int:
    """The largest useful kv_lora_rank: the rank of [keys; values], at most min(d_model, 2 G D)."""
    return min(cfg.d_model, 2 * cfg.n_kv_heads * cfg.head_dim)


def mla_shape(cfg: ModelConfig, *, rank: int | None = None, kv_fraction: float | None = None,
              rope_dim: int | None = None) -> tuple[int, int]:
    """(kv_lora_rank, rope dims) for a conversion of `cfg`, from a rank or from the fraction of the
    source's KV cache per token to keep (exactly one of them). The rope dims default to a third of
    the cache (half the rank), even, at most head_dim. ValueError (one line) for sizes out of range."""
    check_source(cfg)
    if (rank is None) == (kv_fraction is None):
        raise ValueError("--to-mla needs --kv-fraction F or --kv-lora-rank R (one of them)")
    D, top = cfg.head_dim, max_rank(cfg)
    if rope_dim is not None and not (2 <= rope_dim <= D and rope_dim % 2 == 0):
        raise ValueError(f"--rope-dim {rope_dim} out of range: an even number of dims in 2..{D} (head_dim)")
    if kv_fraction is not None:
        if not 0 < kv_fraction <= 1:
            raise ValueError(f"--kv-fraction {kv_fraction} out of range: (0, 1] of the source's KV cache")
        budget = int(kv_fraction * 2 * cfg.n_kv_heads * D)  # values per token and layer: r + dr
        dr = rope_dim if rope_dim is not None else min(D, 2 * max(1, round(budget / 6)))
        rank = min(budget - dr, top)
        if rank < 1:
            raise ValueError(f"--kv-fraction {kv_fraction} leaves {budget} cached values per token and layer: "
                             f"none for the latent after {dr} rope dims")
    else:
        dr = rope_dim if rope_dim is not None else min(D, 2 * max(1, round(rank / 4)))
    if not 0 < rank <= top:
        raise ValueError(f"--kv-lora-rank {rank} out of range: 1..{top} (min of d_model {cfg.d_model} and "
                         f"2 x n_kv_heads x head_dim = {2 * cfg.n_kv_heads * D})")
    return rank, dr


def mla_config(cfg: ModelConfig, rank: int, rope_dim: int) -> ModelConfig:
    """The MLA config a conversion of `cfg` produces: an inference model, so without the training-only
    MTP modules of the source (as HF export drops them). ValueError when MLA's rope of `rope_dim`
    dims cannot rotate at the source's first rope_dim/2 frequencies."""
    rank, rope_dim = mla_shape(cfg, rank=rank, rope_dim=rope_dim)
    D = cfg.head_dim
    dst = cfg.replace(attention="mla", kv_lora_rank=rank, q_lora_rank=0, qk_nope_head_dim=D,  # n_kv_heads, head_dim: unset
                      qk_rope_head_dim=rope_dim, v_head_dim=D, rope_theta=cfg.rope_theta ** (rope_dim / D),
                      kv_latent_norm=False, mtp_depth=0)
    (want, want_factor), (got, got_factor) = rope_inv_freq(cfg), rope_inv_freq(dst)
    if got_factor != want_factor or not torch.allclose(got, want[:rope_dim // 2], rtol=1e-5, atol=0):
        raise ValueError(f"the source's rope scaling does not keep its first {rope_dim // 2} frequencies in a rope key "
                         f"of {rope_dim} dims (use --rope-dim {D})")
    return dst


# -- calibration ---------------------------------------------------------------------------------------

def calibration_windows(tokens: torch.Tensor, seq_len: int, max_seq_len: int) -> torch.Tensor:
    """`tokens` [N] cut into whole windows [N // L, L] of L = min(seq_len, max_seq_len) tokens."""
    seq_len = min(seq_len, max_seq_len)
    n = tokens.numel() // seq_len * seq_len
    if n == 0:
        raise ValueError(f"calibration needs at least {seq_len} tokens, got {tokens.numel()}")
    return tokens[:n].view(-1, seq_len)


@dataclass
class LayerStats:
    """Calibration statistics of one source layer (float64, on the CPU): sigma [d, d] = sum x x^T of
    its attention inputs x; lag [H, L] = sum over queries of head h's attention weight on the key s
    slots back (windows of L tokens). The statistics of two texts add up to those of both."""

    sigma: torch.Tensor
    lag: torch.Tensor

    def __add__(self, other: LayerStats) -> LayerStats:
        return LayerStats(self.sigma + other.sigma, self.lag + other.lag)


def attention_stats(attn, x: torch.Tensor, ctx) -> LayerStats:
    """`LayerStats` of the source attention module `attn` (MHA/GQA/MQA) on its inputs x [B, T, d]:
    windows from position 0, causal; `ctx` the layers' context (the rope angles)."""
    cfg = attn.cfg
    B, T, d = x.shape
    H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    flat = x.reshape(-1, d).double()
    q, k, _ = attn.qkv_proj(x).view(B, T, H + 2 * G, D).split([H, G, G], dim=2)
    if ctx.cos is not None:
        q, k = apply_rope(q, ctx.cos, ctx.sin, cfg.rope_interleave), apply_rope(k, ctx.cos, ctx.sin, cfg.rope_interleave)
    k = k.repeat_interleave(H // G, dim=2)
    lag_of = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).to(x.device)  # [T, T]: query i, key j -> i - j
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * cfg.softmax_scale
    probs = scores.masked_fill(lag_of < 0, float("-inf")).softmax(-1).sum(0)  # [H, T, T]
    # future keys have weight 0: their clamped lag 0 gains nothing
    lag = torch.zeros_like(probs).scatter_add_(-1, lag_of.clamp(min=0).expand(H, T, T), probs).sum(1)  # [H, T]
    return LayerStats((flat.T @ flat).cpu(), lag.cpu())


@torch.no_grad()
def calibration_stats(model: Transformer, tokens: torch.Tensor, seq_len: int = 512, batch: int = 8,
                      progress: Progress | None = None) -> list[LayerStats]:
    """Per layer `LayerStats` of `model`'s own activations over `tokens` [N] cut into windows of
    `seq_len`; `progress(done, total)` after each batch of windows."""
    cfg = model.config
    windows = calibration_windows(tokens, seq_len, cfg.max_seq_len)
    stats: list[LayerStats | None] = [None] * cfg.n_layers
    hooks = []
    for i, layer in enumerate(model.layers):
        def hook(module, args, i=i):
            new = attention_stats(module, args[0], args[1])
            stats[i] = new if stats[i] is None else stats[i] + new
            if i == len(model.layers) - 1:
                raise _Stop  # the last layer's attention and the output layer are not needed
        hooks.append(layer.attn.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        chunks = windows.split(batch)
        for done, chunk in enumerate(chunks, 1):
            try:
                model(chunk.to(model.embed.weight.device))
            except _Stop:
                pass
            if progress is not None:
                progress(done, len(chunks))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


@torch.inference_mode()
def sample_tokens(model: Transformer, start_id: int, n: int, *, seq_len: int = 512, batch: int = 32, seed: int = 0,
                  progress: Progress | None = None) -> torch.Tensor:
    """`n` tokens [n] of text sampled from `model` (temperature 1), in rows of `seq_len` tokens that each
    begin with `start_id` (a document boundary): calibration text from the model's own distribution.
    Rows are sampled `batch` at a time through one cache and the decode layer (`Decoder`), captured once
    as a CUDA graph on a GPU (an eager decode step there is launch-bound); a short last batch is
    sampled full and cut."""
    seq_len = min(seq_len, model.config.max_seq_len)
    device = model.embed.weight.device
    gen = torch.Generator(device).manual_seed(seed)
    rows, out = -(-n // seq_len), []
    batches = range(0, rows, batch)
    steps = len(batches) * (seq_len - 1)
    B = min(batch, rows)
    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache(B, seq_len)
        with torch.no_grad():
            step = GraphDecodeStep(model, cache) if device.type == "cuda" else Decoder(model, cache)
            for k, b0 in enumerate(batches):
                cache.reset()
                tokens = [torch.full((B, 1), start_id, device=device)]
                for t in range(1, seq_len):
                    logits = step(tokens[-1])[:, -1]  # [B, V]
                    tokens.append(torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen))  # [B, 1]
                    if progress is not None:
                        progress(k * (seq_len - 1) + t, steps)
                out.append(torch.cat(tokens, dim=1)[:rows - b0].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).flatten()[:n]


def text_tokens(spec: str, tokenizer, n: int, vocab_size: int, *, skip: int = 0, flag: str = "--calib") -> torch.Tensor:
    """Tokens [<= n] of a text source after its first `skip`: a prepared data directory (its train
    split; its tokenizer must be `tokenizer`), or a corpus / text path tokenized with `tokenizer`.
    Errors name `flag`."""
    from latentformer.data.dataset import TokenData
    from latentformer.data.sources import open_source

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "meta.json").is_file():
        data = TokenData(path)
        if data.tokenizer.describe() != tokenizer.describe():
            raise ValueError(f"{flag} {spec}: prepared with another tokenizer than the source model's")
        tokens = torch.from_numpy(data.tokens("train")[skip:skip + n].astype("int64"))
    else:
        ids: list[int] = []
        for doc in open_source(spec).documents():
            ids += tokenizer.encode(doc.text)
            if len(ids) >= skip + n:
                break
        tokens = torch.tensor(ids[skip:skip + n], dtype=torch.long)
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{flag} {spec}: token id {int(tokens.max())} outside the model's vocabulary ({vocab_size})")
    return tokens


def calibration_parts(spec: str, n: int) -> dict[str, int]:
    """`--calib` "a,b,..." -> {part: tokens}: `n` shared evenly (the first parts take the remainder)."""
    parts = [p.strip() for p in spec.split(",")]
    if not all(parts) or len(set(parts)) != len(parts):
        raise ValueError(f"--calib {spec!r}: expected distinct comma-separated sources")
    return {p: n // len(parts) + (i < n % len(parts)) for i, p in enumerate(parts)}


def calibration_tokens(spec: str, model: Transformer, tokenizer, n: int,
                       progress: Callable[[str], Progress] | None = None) -> torch.Tensor:
    """The calibration tokens [<= n] of `--calib` `spec`: its parts' shares, concatenated; the part
    `samples` is text sampled from `model` (`sample_tokens`), the others are `text_tokens`."""
    out = []
    for part, count in calibration_parts(spec, n).items():
        if part == SAMPLES:
            out.append(sample_tokens(model, tokenizer.eot_id, count, progress=progress and progress("sampling calibration text")))
        else:
            out.append(text_tokens(part, tokenizer, count, model.config.vocab_size))
    return torch.cat(out)


# -- the conversion of one layer ---------------------------------------------------------------------------

def _psd_power(m: torch.Tensor, p: float) -> torch.Tensor:
    """m^p of symmetric PSD matrices [..., k, k], eigenvalues floored at FLOOR x the largest."""
    lam, u = torch.linalg.eigh(m)
    lam = lam.clamp(min=FLOOR * lam[..., -1:].clamp(min=torch.finfo(lam.dtype).tiny))
    return (u * lam[..., None, :] ** p) @ u.transpose(-1, -2)


def rope_dims(D: int, n: int, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The source head dims [2n] of pairs 0..n-1 in MLA's rope order (pair i at MLA dims (i, i + n),
    or (2i, 2i+1) interleaved, as the source), and the pair of each [2n]."""
    if interleave:
        return torch.arange(2 * n), torch.arange(n).repeat_interleave(2)
    return torch.cat((torch.arange(n), D // 2 + torch.arange(n))), torch.arange(n).repeat(2)


def rope_merge(cov: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: the mix a [n, G] of the KV heads' keys into k_pe, and each group's share beta [n, G] of
    it, from the pairs' key covariances cov [n, G, G] and the groups' query energies energy [n, G]
    (module docstring, 2): a = C^-1/2 b with b the top eigenvector of C^1/2 diag(Q) C^1/2."""
    lam, u = torch.linalg.eigh(cov)
    keep = lam > FLOOR * lam[:, -1:]
    root = u * torch.where(keep, lam.clamp(min=0).sqrt(), 0)[:, None, :]  # C^1/2 on C's range
    inv = u * torch.where(keep, lam.clamp(min=torch.finfo(lam.dtype).tiny).rsqrt(), 0)[:, None, :]
    b = torch.linalg.eigh(torch.einsum("ngj,ng,ngk->njk", root, energy, root)).eigenvectors[..., -1]  # [n, G]
    a = torch.einsum("ngj,nj->ng", inv, b)
    ca = torch.einsum("ngh,nh->ng", cov, a)
    beta = ca / (a * ca).sum(-1, keepdim=True).clamp(min=torch.finfo(ca.dtype).tiny)  # a pair without keys: 0
    return a, beta


def joint_latent(w_y: torch.Tensor, sigma: torch.Tensor, key_metric: torch.Tensor, value_metric: torch.Tensor,
                 r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent rows [r, d] and up-projection [2GD, r] of y = w_y x ([G keys; G values] of D dims,
    w_y [2GD, d]) from the PCA in the output-aware metric (module docstring, 4); metric blocks [G, D, D]."""
    G, D, _ = key_metric.shape
    w_k, w_v = w_y.view(2, G, D, -1)

    def weighted_variance(m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # sum_g tr(m_g w_g Sigma w_g^T)
        return torch.einsum("gij,gjd,de,gie->", m, w, sigma, w)

    key_metric = key_metric * (weighted_variance(value_metric, w_v)
                               / weighted_variance(key_metric, w_k).clamp(min=torch.finfo(w_y.dtype).tiny))
    blocks = torch.cat((key_metric, value_metric))  # [2G, D, D]
    root, inv = torch.block_diag(*_psd_power(blocks, 0.5)), torch.block_diag(*_psd_power(blocks, -0.5))
    m_y = root @ w_y  # [2GD, d]
    u = torch.linalg.eigh(m_y @ sigma @ m_y.T).eigenvectors.flip(-1)[:, :r]  # [2GD, r], descending
    return u.T @ m_y, inv @ u


def mean_rotation(w_q: torch.Tensor, lag: torch.Tensor, src: ModelConfig, n: int) -> torch.Tensor:
    """The queries w_q [H, D, d] with each kept pair f < n of head h turned by A_hf^T (module docstring,
    3): A_hf = sum_s p_h(s) R(-w_f s), p_h = lag [H, L] normalized per head, w_f the source's frequencies."""
    inv_freq = rope_inv_freq(src)[0][:n].double()  # [n]
    p = lag / lag.sum(-1, keepdim=True)
    angle = torch.arange(lag.shape[-1], dtype=torch.float64)[:, None] * inv_freq  # [L, n]
    c, s = (p @ torch.cos(angle))[..., None], (p @ torch.sin(angle))[..., None]  # [H, n, 1]
    half = torch.arange(n)
    x1, x2 = (2 * half, 2 * half + 1) if src.rope_interleave else (half, half + w_q.shape[1] // 2)  # rope.apply_rope's pairs
    out = w_q.clone()
    out[:, x1], out[:, x2] = c * w_q[:, x1] - s * w_q[:, x2], s * w_q[:, x1] + c * w_q[:, x2]
    return out


def convert_attention(attn, src: ModelConfig, dst: ModelConfig, stats: LayerStats) -> dict[str, torch.Tensor]:
    """The MLA attention weights (float64, our parameter names under `attn.`) of one source layer."""
    H, G, D, d, r, dr = src.n_heads, src.n_kv_heads, src.head_dim, src.d_model, dst.kv_lora_rank, dst.qk_rope_head_dim
    sigma = stats.sigma
    w = attn.qkv_proj.weight.detach().double().cpu()  # small eigenproblems: on the CPU, as Sigma
    w_q, w_k, w_v = w.view(H + 2 * G, D, d).split([H, G, G])  # [H,D,d], [G,D,d], [G,D,d]
    w_o = attn.o_proj.weight.detach().double().cpu().view(d, H, D)
    group = torch.arange(H) // (H // G)
    to_group = torch.nn.functional.one_hot(group, G).double()  # [H, G]

    # 1-2. the kept pairs' rope key: per pair, key covariance [n, G, G] and query energy per group [n, G]
    dims, pair = rope_dims(D, dr // 2, src.rope_interleave)
    n = dr // 2
    k_r, q_r = w_k[:, dims], w_q[:, dims]  # [G, dr, d], [H, dr, d]
    cov = torch.zeros(n, G, G, dtype=w.dtype).index_add_(0, pair, torch.einsum("gid,de,hie->igh", k_r, sigma, k_r))
    energy = torch.zeros(n, H, dtype=w.dtype).index_add_(0, pair, torch.einsum("hid,de,hie->ih", q_r, sigma, q_r))
    a, beta = rope_merge(cov, energy @ to_group)  # [n, G] each
    k_pe = torch.einsum("ig,gid->id", a[pair], k_r)  # [dr, d]
    q_pe = (beta[pair] @ to_group.T).T[..., None] * q_r  # [H, dr, d]: beta_{g(h)} q_h on pair(i)
    # 3. the residual keys [G, D, d]: unrotated, scored against the source's own queries
    w_kappa = w_k.clone()
    w_kappa[:, dims] -= beta[pair].T[..., None] * k_pe

    w_q_nope = mean_rotation(w_q, stats.lag, src, n)  # [H, D, d]: against the residual, turned by its mean rotation

    # 4. the joint latent of [kappa; v] in the output-aware metric
    key_metric = torch.einsum("hg,hid,de,hje->gij", to_group, w_q_nope, sigma, w_q_nope)  # [G, D, D]
    value_metric = torch.einsum("hg,ohi,ohj->gij", to_group, w_o, w_o)  # [G, D, D]
    w_y = torch.cat((w_kappa, w_v)).reshape(2 * G * D, d)
    latent, up = joint_latent(w_y, sigma, key_metric, value_metric, r)
    k_up, v_up = up.view(2, G, D, r)
    kv_b = torch.cat((k_up[group], v_up[group]), dim=1)  # [H, 2D, r]

    # 6. the source's softmax scale, folded into the queries
    q_scale = src.softmax_scale / dst.softmax_scale
    return {
        "q_proj.weight": torch.cat((w_q_nope, q_pe), dim=1).reshape(H * (D + dr), d) * q_scale,
        "kv_a_proj.weight": torch.cat((latent, k_pe)),
        "kv_b_proj.weight": kv_b.reshape(H * 2 * D, r),
        "o_proj.weight": w_o.reshape(d, H * D),
    }


# -- the model ------------------------------------------------------------------------------------------

def mla_shell(model: Transformer, dst: ModelConfig) -> Transformer:
    """The MLA model of config `dst` (eval mode) with `model`'s weights outside attention (shared, not
    copied) and its attention weights uninitialized, to be filled layer by layer."""
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    with torch.device("meta"):
        out = Transformer(dst)
    state = {k: v for k, v in model.state_dict().items() if ".attn." not in k and not k.startswith("mtp.")}
    state |= {k: torch.empty(v.shape, dtype=dtype, device=device) for k, v in out.state_dict().items() if ".attn." in k}
    out.load_state_dict(state, strict=True, assign=True)
    if dst.tie_embeddings:
        out.lm_head.weight = out.embed.weight
    out.init_derived_buffers()
    return out.to(device).eval()


def block_inputs(model: Transformer, windows: torch.Tensor, batch: int) -> tuple[torch.Tensor, object]:
    """The first block's inputs [N, L, d] for calibration `windows` [N, L] (on the model's device), and
    the layers' context (rope angles of positions 0..L-1, causal: the same for every window)."""
    x, ctx = model.context(windows[:1].to(model.embed.weight.device), None)
    return torch.cat([model.context(w.to(x.device), None)[0] for w in windows.split(batch)]), ctx


def attention_input_stats(block, x: torch.Tensor, ctx, source_attn, source_ctx, batch: int) -> LayerStats:
    """`LayerStats` of the attention inputs h of `block` (context `ctx`) for its inputs `x` [N, L, d],
    the lag profile that of `source_attn` (the source layer's attention, context `source_ctx`: the
    source's rope) on them; `block`'s own attention does not run (its weights may be unset)."""
    stats: list[LayerStats] = []

    def hook(_module, args):
        stats.append(attention_stats(source_attn, args[0], source_ctx))
        raise _Stop

    handle = block.attn.register_forward_pre_hook(hook)
    try:
        for chunk in x.split(batch):
            try:
                block(chunk, ctx)
            except _Stop:
                pass
    finally:
        handle.remove()
    return sum(stats[1:], stats[0])


@torch.no_grad()
def to_mla(model: Transformer, tokens: torch.Tensor | None, rank: int, rope_dim: int, *, seq_len: int = 512,
           stats: list[LayerStats] | None = None, sequential: bool = False, batch: int = 8,
           progress: Callable[[str], Progress] | None = None) -> Transformer:
    """The MLA model (same dtype and device as `model`) converted from `model` with calibration
    `tokens` [N]; `stats` (from `calibration_stats`) may be given instead, to convert at several sizes.
    `sequential`: layer i's statistics from the converted model's layers < i on `tokens` (module docstring),
    its windows run through each converted block in batches of `batch`. `progress(phase)`
    ("calibrating", "converting layers") returns the phase's `(done, total)` callback."""
    src = model.config
    dst = mla_config(src, rank, rope_dim)
    if sequential and stats is not None:
        raise ValueError("sequential calibration takes the calibration tokens, not statistics of the source")
    if stats is None and not sequential:
        stats = calibration_stats(model, tokens, seq_len, progress=progress and progress("calibrating"))
    out = mla_shell(model, dst)
    if sequential:
        windows = calibration_windows(tokens, seq_len, src.max_seq_len)
        x, ctx = block_inputs(out, windows, batch)  # [N, L, d]
        source_ctx = model.context(windows[:1].to(x.device), None)[1]  # the source's rope angles, for its attention
    layers_done = progress and progress("converting layers")
    for i, (layer, new) in enumerate(zip(model.layers, out.layers)):
        layer_stats = attention_input_stats(new, x, ctx, layer.attn, source_ctx, batch) if sequential else stats[i]
        for name, value in convert_attention(layer.attn, src, dst, layer_stats).items():
            new.attn.get_parameter(name).copy_(value)
        if sequential and i + 1 < len(out.layers):
            x = torch.cat([new(chunk, ctx) for chunk in x.split(batch)])  # the next layer's inputs, through this converted layer
        if layers_done:
            layers_done(i + 1, len(model.layers))
    return out
