"""A pretrained MHA/GQA checkpoint -> an MLA one (the TransMLA / MHA2MLA line of work:
Meng et al. 2025, "TransMLA: Multi-Head Latent Attention Is All You Need"; Ji et al. 2025,
"Towards Economical Inference: Enabling DeepSeek's Multi-Head Latent Attention in Any
Transformer-based LLMs"). Our own derivation, per layer, from calibration statistics:

Legend: H query heads, G key/value heads, D head_dim, group g(h) = h // (H/G), r = kv_lora_rank,
Sigma = sum over calibration tokens of x x^T (x: the attention's input, already normalized).

1. Rope merge (RoRoPE-style). RoPE rotates frequency pair f of every KV head by the same 2-D
   rotation, so an orthogonal G x G mix V_f of the heads' pair-f components, the same for both
   components of the pair, commutes with it: k'_{j,f} = sum_g V_f[g, j] k_{g,f} and, as V_f is
   orthogonal, q_{h,f} . k_{g(h),f} = sum_j (V_f[g(h), j] q_{h,f}) . k'_{j,f} at every pair of
   positions. V_f = eigenvectors (descending) of the G x G covariance of the pre-RoPE keys'
   pair-f components (both components pooled), so slot 0 carries most key energy. Slot 0 of
   every pair is MLA's one shared rope key k_pe (dr = D); query head h gets q_pe = V_f[g(h), 0] q_h
   (exact). Slots 1..G-1 become the non-rope key k_nope ((G-1) D dims, shared by all heads), with
   the query V_f[g(h), j] q_h: they lose their rotation — approximation 1, nil when G = 1 or the
   keys of all heads are identical. An MQA source (G = 1) has no such key and MLA needs one
   (qk_nope_head_dim > 0): refused rather than padded with a dimension that never carries signal.
   Pairs are rope.apply_rope's: (i, i + D/2), or (2i, 2i+1) when interleaved. MLA rotates its
   rope part with the same function, dims and frequencies, so q_pe / k_pe keep the source layout.
2. Softmax scale: the source's over MLA's (1/sqrt(D) vs 1/sqrt(dn + dr), YaRN's mscale included)
   is folded into the query weights, so the scores are unchanged.
3. Latent: the outputs y = [k_nope; v] ((2G-1) D dims) are compressed by PCA of their
   calibration covariance W_y Sigma W_y^T (activation-aware), keys first scaled so that their
   total variance equals the values' (TransMLA's balanced-KV PCA; undone in the up-projection):
   kv_a_proj's latent rows = P^T S W_y, kv_b_proj = S^-1 P, with P the top-r eigenvectors.
   At r = (2G-1) D this is exact.
4. MLA normalizes the latent (kv_a_norm, an RMSNorm): its per-token scale cannot be undone
   exactly — approximation 2. Its weight is set to the latent's mean RMS over calibration
   tokens, so c_norm = c on average.
Everything else (embeddings, norms, FFN/MoE, o_proj, output layer) is copied unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from latentformer.config import ModelConfig
from latentformer.model.transformer import Transformer

Progress = Callable[[int, int], None]  # (done, total) of a phase

# rows of the attention input kept per layer to estimate the latent's mean RMS (Sigma needs none)
RMS_SAMPLE_ROWS = 4096


class _Stop(Exception):
    """Ends the calibration forward once the last layer's attention input is seen."""


def check_source(cfg: ModelConfig, rank: int) -> None:
    """ValueError (one line) when `cfg` cannot become MLA at kv_lora_rank `rank`."""
    if cfg.attention == "mla":
        raise ValueError("the source is already an MLA model (attention: mla)")
    if cfg.attention not in ("mha", "gqa", "mqa"):
        raise ValueError(f"the source's attention is {cfg.attention}: the conversion maps the key/value heads of mha/gqa/mqa")
    if not cfg.rope:
        raise ValueError("the source has no rotary positions (rope: false): the conversion needs full RoPE")
    if cfg.n_kv_heads == 1:
        raise ValueError("an MQA source (n_kv_heads = 1) has no non-rope key for MLA (qk_nope_head_dim must be > 0)")
    if cfg.qkv_bias:
        raise ValueError("the source has q/k/v biases (qkv_bias), which MLA cannot express")
    limit = min(cfg.d_model, (2 * cfg.n_kv_heads - 1) * cfg.head_dim)
    if not 0 < rank <= limit:
        raise ValueError(f"--kv-lora-rank {rank} out of range: 1..{limit} (min of d_model {cfg.d_model} and "
                         f"(2 x n_kv_heads - 1) x head_dim = {(2 * cfg.n_kv_heads - 1) * cfg.head_dim})")


def mla_config(cfg: ModelConfig, rank: int) -> ModelConfig:
    """The MLA config a conversion of `cfg` at kv_lora_rank `rank` produces: an inference model, so
    without the training-only MTP modules of the source (as HF export drops them)."""
    check_source(cfg, rank)
    G, D = cfg.n_kv_heads, cfg.head_dim
    return cfg.replace(attention="mla", kv_lora_rank=rank, q_lora_rank=0,  # n_kv_heads, head_dim: unset
                       qk_nope_head_dim=(G - 1) * D, qk_rope_head_dim=D, v_head_dim=D, mtp_depth=0)


@torch.no_grad()
def calibration_stats(model: Transformer, tokens: torch.Tensor, seq_len: int = 512, batch: int = 8,
                      progress: Progress | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (Sigma [d, d] float64 = sum x x^T, sample [<= RMS_SAMPLE_ROWS, d]) of the attention
    inputs x of `model` over `tokens` [N] cut into windows of `seq_len`; `progress(done, total)`
    after each batch of windows."""
    cfg = model.config
    seq_len = min(seq_len, cfg.max_seq_len)
    n = tokens.numel() // seq_len * seq_len
    if n == 0:
        raise ValueError(f"calibration needs at least {seq_len} tokens, got {tokens.numel()}")
    windows = tokens[:n].view(-1, seq_len)
    d = cfg.d_model
    sigma = [torch.zeros(d, d, dtype=torch.float64) for _ in model.layers]
    sample: list[list[torch.Tensor]] = [[] for _ in model.layers]
    per_window = max(1, RMS_SAMPLE_ROWS // windows.shape[0])  # spread the sample over the windows
    hooks = []
    for i, layer in enumerate(model.layers):
        def hook(_module, args, i=i):
            x = args[0].reshape(-1, d).double()
            sigma[i] += x.T @ x
            sample[i].append(args[0][:, :per_window].reshape(-1, d).float())
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
    return [(s, torch.cat(rows)[:RMS_SAMPLE_ROWS]) for s, rows in zip(sigma, sample)]


def calibration_text_tokens(spec: str, tokenizer, n: int, vocab_size: int) -> torch.Tensor:
    """The first `n` tokens [<= n] of a calibration source: a prepared data directory (its train
    split; its tokenizer must be `tokenizer`), or a corpus / text path tokenized with `tokenizer`."""
    from latentformer.data.dataset import TokenData
    from latentformer.data.sources import open_source

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "meta.json").is_file():
        data = TokenData(path)
        if data.tokenizer.describe() != tokenizer.describe():
            raise ValueError(f"--calib {spec}: prepared with another tokenizer than the source model's")
        tokens = torch.from_numpy(data.tokens("train")[:n].astype("int64"))
    else:
        ids: list[int] = []
        for doc in open_source(spec).documents():
            ids += tokenizer.encode(doc.text)
            if len(ids) >= n:
                break
        tokens = torch.tensor(ids[:n], dtype=torch.long)
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(f"--calib {spec}: token id {int(tokens.max())} outside the model's vocabulary ({vocab_size})")
    return tokens


def _pair_index(D: int, interleave: bool) -> torch.Tensor:
    """The rope frequency pair f of each of the D head dims (apply_rope's layout)."""
    f = torch.arange(D // 2)
    return f.repeat_interleave(2) if interleave else torch.cat((f, f))


def convert_attention(attn, src: ModelConfig, dst: ModelConfig, sigma: torch.Tensor, sample: torch.Tensor,
                      balance: bool = True) -> dict[str, torch.Tensor]:
    """The MLA attention weights (float64, our parameter names under `attn.`) of one source layer."""
    H, G, D, d, r = src.n_heads, src.n_kv_heads, src.head_dim, src.d_model, dst.kv_lora_rank
    w = attn.qkv_proj.weight.detach().double()
    w_q, w_k, w_v = w.view(H + 2 * G, D, d).split([H, G, G])  # [H,D,d], [G,D,d], [G,D,d]
    group = torch.arange(H) // (H // G)

    # 1. rope merge: per frequency pair, the eigenbasis of the G x G key covariance
    pair = _pair_index(D, src.rope_interleave)
    cov = torch.einsum("gid,de,hie->igh", w_k, sigma, w_k)  # [D, G, G] per dim
    cov = torch.zeros(D // 2, G, G, dtype=cov.dtype).index_add_(0, pair, cov)  # both components pooled
    vecs = torch.linalg.eigh(cov).eigenvectors.flip(-1)  # [D/2, G(g), G(j)], descending eigenvalues
    mix = vecs[pair]  # [D, G, G] per dim
    k_mixed = torch.einsum("igj,gid->jid", mix, w_k)  # [G(j), D, d]
    # 2. the source's softmax scale, folded into the queries
    q_scale = src.softmax_scale / dst.softmax_scale
    q_mixed = torch.einsum("hij,hid->hjid", mix[:, group].transpose(0, 1), w_q) * q_scale  # [H, G(j), D, d]
    q_nope, q_pe = q_mixed[:, 1:].reshape(H, (G - 1) * D, d), q_mixed[:, 0]

    # 3. latent: PCA of the [k_nope; v] outputs, keys balanced against values
    nk = (G - 1) * D
    w_y = torch.cat((k_mixed[1:].reshape(nk, d), w_v.reshape(G * D, d)))  # [(2G-1)D, d]
    var = torch.einsum("yd,de,ye->y", w_y, sigma, w_y)
    alpha = math.sqrt(var[nk:].sum() / var[:nk].sum()) if balance and var[:nk].sum() > 0 else 1.0
    scale = torch.cat((torch.full((nk,), alpha, dtype=w_y.dtype), torch.ones(G * D, dtype=w_y.dtype)))
    w_s = scale[:, None] * w_y
    p = torch.linalg.eigh(w_s @ sigma @ w_s.T).eigenvectors.flip(-1)[:, :r]  # [(2G-1)D, r]
    latent = p.T @ w_s  # [r, d]
    up = p / scale[:, None]  # [(2G-1)D, r]
    k_up, v_up = up[:nk], up[nk:].view(G, D, r)
    kv_b = torch.cat((k_up.expand(H, nk, r), v_up[group]), dim=1)  # [H, nk + D, r]

    # 4. the latent norm's weight: the latent's mean RMS, so that c_norm = c on average
    c = sample.double() @ latent.T
    rms = (c.pow(2).mean(-1) + dst.latent_eps).sqrt().mean()
    return {
        "q_proj.weight": torch.cat((q_nope, q_pe), dim=1).reshape(H * (nk + D), d),
        "kv_a_proj.weight": torch.cat((latent, k_mixed[0])),
        "kv_a_norm.weight": torch.full((r,), float(rms), dtype=torch.float64),
        "kv_b_proj.weight": kv_b.reshape(H * (nk + D), r),
        "o_proj.weight": attn.o_proj.weight.detach().double(),
    }


@torch.no_grad()
def to_mla(model: Transformer, tokens: torch.Tensor, rank: int, *, balance: bool = True, seq_len: int = 512,
           stats: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
           progress: Callable[[str], Progress] | None = None) -> Transformer:
    """The MLA model (same dtype and device as `model`) converted from `model` with calibration
    `tokens` [N]; `stats` (from `calibration_stats`) may be given instead, to convert at several ranks.
    `progress(phase)` ("calibrating", "converting layers") returns the phase's `(done, total)` callback."""
    src = model.config
    dst = mla_config(src, rank)
    if stats is None:
        stats = calibration_stats(model, tokens, seq_len, progress=progress and progress("calibrating"))
    layers_done = progress and progress("converting layers")
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    state = {k: v for k, v in model.state_dict().items() if ".attn." not in k and not k.startswith("mtp.")}
    for i, (layer, (sigma, sample)) in enumerate(zip(model.layers, stats)):
        for name, value in convert_attention(layer.attn, src, dst, sigma, sample, balance).items():
            state[f"layers.{i}.attn.{name}"] = value.to(dtype)
        if layers_done:
            layers_done(i + 1, len(model.layers))
    with torch.device("meta"):
        out = Transformer(dst)
    out.load_state_dict(state, strict=True, assign=True)
    if dst.tie_embeddings:
        out.lm_head.weight = out.embed.weight
    out.init_derived_buffers()
    return out.to(device).eval()
