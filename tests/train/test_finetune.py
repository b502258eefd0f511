"""`latentformer finetune`: the held-out assistant loss falls and the model answers in its chat format;
LoRA through peft merges into plain weights that decode absorbed == naive == full forward; a LoRA run
resumes bit-identically; bad input is one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import latentformer as lf
from latentformer.checkpoint import ADAPTER, load_model, read_weights, save_checkpoint, step_dirs
from latentformer.cli import main
from latentformer.config import ModelConfig
from latentformer.data.chat_demo import write_demo
from latentformer.data.conversations import ChatData, read_conversations
from latentformer.data.tokenizer import load_tokenizer, train_bpe
from latentformer.infer.chat import chat_stops, render_chat
from latentformer.infer.decode import Decoder
from latentformer.model.transformer import Transformer
from latentformer.train.config import DataConfig, RunConfig, TrainConfig
from latentformer.train.evaluate import evaluate_batches
from latentformer.train.trainer import Trainer

pytest.importorskip("peft", reason="LoRA needs peft: pip install 'latentformer[finetune]'")

FAST = ["--train.device", "cpu", "--train.threads", "1", "--train.progress", "false", "--train.tensorboard", "false"]
# MLA with query compression: LoRA on q_a_proj, q_b_proj, kv_a_proj, kv_b_proj and o_proj
TINY = dict(n_layers=2, d_model=64, n_heads=2, max_seq_len=256, attention="mla", kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, d_ff=128, q_lora_rank=24)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo") / "sotu-chat.jsonl")


@pytest.fixture(scope="module")
def base(tmp_path_factory, demo) -> Path:
    """A fresh tiny MLA base model with a 512-token BPE trained on the demo conversations' transcripts."""
    byte = load_tokenizer("byte")
    tok = train_bpe([render_chat(byte, messages, False) for _, _, messages in read_conversations(demo)], 512)
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", Transformer(ModelConfig(vocab_size=512, **TINY)), tok)


def lora_config(base: Path, demo: Path, **train) -> RunConfig:
    t = dict(device="cpu", threads=1, max_time_minutes=0, seq_len=192, micro_batch_size=4, batch_tokens=192 * 8,
             max_steps=6, lr=1e-2, warmup_steps=1, eval_interval=0, log_interval=2, progress=False, tensorboard=False,
             sample_tokens=0, lora_rank=4, lora_alpha=8)
    t.update(train)
    return RunConfig(lf.ModelConfig(vocab_size=512, **TINY), DataConfig(chat_file=str(demo), tokenizer=str(base)),
                     TrainConfig(**t))


def test_full_finetune_lowers_the_held_out_loss_and_answers_in_the_chat_format(base, demo, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", str(base), "--data", str(demo), "--out", str(run), "--train.lr", "3e-3",
                 "--train.max_steps", "80", "--no-sample", *FAST]) == 0
    assert "batch 8 conversations of up to 192 tokens" in capsys.readouterr().err  # the longest (149), rounded up
    tok = load_tokenizer(base)
    data = ChatData(demo, tok, 192)
    before, after = (evaluate_batches(load_model(p), data.eval_batches("val", 32, 192), bytes_per_token=1.0)["loss"]
                     for p in (base, run / "checkpoints" / "best"))
    assert before > 5.5 and after < before - 3.0  # assistant tokens only, held out
    model, tok = lf.load(run, device="cpu")
    for messages in data.messages["val"][:4]:  # the plain transcript: a one-line reply, ended by end-of-text
        prompt = render_chat(tok, messages[:-1])
        reply = lf.generate(model, tok, prompt, max_new_tokens=40, temperature=0, stop=chat_stops(tok))
        assert len(tok.encode(reply)) < 40 and "\n" not in reply.strip() and reply.strip()


def test_recipe_fills_what_the_user_left(base, demo):
    from latentformer.cli.finetune import recipe

    data = ChatData(demo, load_tokenizer(base), 256)
    full, lora = RunConfig(train=TrainConfig()), RunConfig(train=TrainConfig(lora_rank=8))
    assert recipe(data, full, 256, 1, set(), 2e-3)["train.lr"] == 1e-3  # a model trained here: half its peak lr
    assert recipe(data, full, 256, 1, set(), None)["train.lr"] == 2e-5  # an imported model
    assert recipe(data, lora, 256, 1, set(), 2e-3)["train.lr"] == 2e-4
    given = recipe(data, RunConfig(train=TrainConfig(seq_len=256, lr=5e-4)), 256, 2, {"train.seq_len", "train.lr"}, None)
    assert "train.lr" not in given and given["train.min_lr"] == 5e-5 and given["train.batch_tokens"] == 8 * 256 * 2
    assert given["train.max_steps"] == 23 and given["train.warmup_steps"] == 2  # 2 epochs of 180 at 16 a step


def test_lora_checkpoints_hold_merged_weights_that_decode_absorbed_naive_and_full_alike(base, demo, tmp_path):
    trainer = Trainer(lora_config(base, demo), tmp_path / "run", init_from=base)
    trainer.fit()
    assert trainer.lora is None and type(trainer.model) is Transformer  # merged at the end (merge_and_unload)
    final = step_dirs(tmp_path / "run")[-1]
    saved, merged = read_weights(final), trainer.model.state_dict()
    assert all(torch.equal(saved[k], merged[k]) for k in saved)  # the checkpoint == peft's merge, exactly
    start = read_weights(base)
    changed = {k.split(".")[-2] for k in saved if not torch.equal(saved[k], start[k])}
    assert changed == {"q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (final / ADAPTER).is_file()

    model = load_model(final)
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        for mla_decode in ("naive", "absorb"):
            cache = model.make_cache(2, 24)
            step = Decoder(model, cache, mla_decode=mla_decode)
            logits = torch.cat([step(tokens[:, :8])] + [step(tokens[:, t:t + 1]) for t in range(8, 24)], dim=1)
            assert torch.allclose(logits, full, atol=1e-5), (mla_decode, (logits - full).abs().max())


def test_the_decode_layer_never_decodes_unmerged_adapters(base):
    from latentformer.train.lora import apply_lora, merge

    model = load_model(base)
    tokens = torch.randint(0, 512, (1, 9))
    decoder = Decoder(model, model.make_cache(1, 16))  # absorbed weights derived from the base weights
    config = TrainConfig(lora_rank=4, lora_targets=["kv_b_proj", "q_b_proj"])
    lora = apply_lora(model, config)
    with pytest.raises(ValueError, match="LoRA adapters that are not merged"):
        Decoder(model, model.make_cache(1, 16))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    merge(lora)
    with torch.no_grad():
        old = decoder(tokens[:, :8]), decoder(tokens[:, 8:])  # the first decoder rebuilds from the merged weights
        fresh = Decoder(model, model.make_cache(1, 16))
        new = fresh(tokens[:, :8]), fresh(tokens[:, 8:])
        assert torch.allclose(old[1], new[1], atol=1e-6) and torch.allclose(new[1][:, -1], model(tokens)[:, -1], atol=1e-5)


class Interrupt(Exception):
    pass


def test_lora_resume_is_bit_identical(base, demo, tmp_path):
    cfg = lora_config(base, demo, max_steps=8, checkpoint_interval=3, lora_dropout=0.1)  # dropout: the RNG resumes too
    full = Trainer(cfg, tmp_path / "a", init_from=base)
    full.fit()

    def crash(trainer, step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(cfg, tmp_path / "b", init_from=base, on_step=[crash]).fit()
    resumed = Trainer(cfg, tmp_path / "b", resume=True)
    assert resumed.step == 3
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ends = [read_weights(step_dirs(tmp_path / run)[-1]) for run in ("a", "b")]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    adapters = [load_file(str(step_dirs(tmp_path / run)[-1] / ADAPTER)) for run in ("a", "b")]
    assert adapters[0].keys() == adapters[1].keys() and all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_lora_through_the_cli_then_generate(base, demo, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", str(base), "--data", str(demo), "--out", str(run), "--lora-rank", "4",
                 "--lora-targets", "kv_b_proj,o_proj", "--train.max_steps", "3", *FAST]) == 0
    out = capsys.readouterr().out
    assert "sample (a held-out conversation, greedy)" in out and "reference:" in out
    config = (run / "config.yaml").read_text()
    assert "lora_rank: 4" in config and "- kv_b_proj" in config
    assert main(["finetune", str(run), "--resume", "--train.max_steps", "4", "--no-sample"]) == 0
    assert "resumed from" in capsys.readouterr().err and step_dirs(run)[-1].name == "step_4"
    assert main(["generate", str(run), "--prompt", "User: hi\nAssistant:", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--device", "cpu"]) == 0  # the run's held-out conversations
    result = json.loads(capsys.readouterr().out)
    held_out = ChatData(demo, load_tokenizer(base), 192)
    assert result["data"] == str(demo) and result["tokens"] == held_out.learned_tokens("val")


def test_lora_ddp_and_accumulation_equal_one_batch(base, demo, tmp_path):
    """A step's loss is the mean over the global batch's assistant tokens, however its 4 conversations are
    split: 2 ranks x 2 rows == 1 process accumulating 2 x 2 == 1 process with 4 rows at once."""
    args = ["--data", str(demo), "--lora-rank", "4", "--train.seq_len", "192", "--train.micro_batch_size", "2",
            "--train.batch_tokens", "768", "--train.max_steps", "3", "--train.eval_interval", "0", "--no-sample", *FAST]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
                          "-m", "latentformer", "finetune", str(base), "--out", str(tmp_path / "ddp"), *args],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 x 192 x 1 accum x 2 ranks" in ddp.stderr
    assert main(["finetune", str(base), "--out", str(tmp_path / "one"), *args]) == 0
    assert main(["finetune", str(base), "--out", str(tmp_path / "whole"), *args, "--train.micro_batch_size", "4"]) == 0
    a, b, c = (read_weights(step_dirs(tmp_path / run)[-1]) for run in ("ddp", "one", "whole"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((c[k] - b[k]).abs().max().item() for k in a) < 1e-5


def one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and expected in lines[0], captured.err


def test_cli_errors_are_one_line(base, demo, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"messages": [\n')
    run = ["--out", str(tmp_path / "run"), *FAST]
    one_line_error(capsys, ["finetune", str(base), "--data", str(bad), *run], f"{bad}:3: not valid JSON")
    (tmp_path / "none.jsonl").write_text("\n")
    one_line_error(capsys, ["finetune", str(base), "--data", str(tmp_path / "none.jsonl"), *run], "no conversations (the file is empty)")
    one_line_error(capsys, ["finetune", str(base), "--data", str(demo), "--train.seq_len", "64", *run],
                   "tokens, longer than the context of 64 tokens")
    one_line_error(capsys, ["finetune", str(base), *run], "give the conversations to fine-tune on: --data FILE.jsonl")
    one_line_error(capsys, ["finetune", str(base), "--data", str(demo), "--resume", *run],
                   "--resume continues the run RUN_OR_CHECKPOINT with its saved config.yaml: give only overrides with it")
    one_line_error(capsys, ["finetune", str(base), "--data", str(demo), "--model.n_layers", "3", *run],
                   "finetune takes the model config from the checkpoint: drop --model.n_layers")
    one_line_error(capsys, ["finetune", str(base), "--data", str(demo), "--lora-rank", "4", "--lora-targets", "wq", *run],
                   "train.lora_targets: no projection named 'wq' in this model's layers (its projections: down_proj,")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="LoRA adapts pretrained weights: start from a checkpoint"):
        Trainer(lora_config(base, demo), tmp_path / "run")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    one_line_error(capsys, ["finetune", str(base), "--data", str(demo), "--lora-rank", "4", *run],
                   "LoRA (train.lora_rank > 0) needs the peft library: pip install 'latentformer[finetune]'")


def test_lora_distilled_from_its_own_base_gets_no_gradient_and_from_another_model_learns(base, demo, tmp_path):
    """Distillation on chat data with LoRA: the adapters start at zero (the model is its base), so a base
    teacher gives KL 0 and no gradient on the assistant tokens; another teacher gives a KL that falls."""
    own = Trainer(lora_config(base, demo, teacher=str(base), distill_weight=1.0), tmp_path / "own", init_from=base)
    loss, norm, finite = own.train_step()
    assert finite and loss > 1.0 and abs(own.distill_loss) < 1e-6 and norm < 1e-6
    torch.manual_seed(5)
    teacher = load_model(base)
    with torch.no_grad():  # the base with every attention output projection moved: what LoRA on o_proj can learn
        for layer in teacher.layers:
            layer.attn.o_proj.weight.add_(0.3 * torch.randn_like(layer.attn.o_proj.weight))
    other = save_checkpoint(tmp_path / "other", teacher, load_tokenizer(base))
    trainer = Trainer(lora_config(base, demo, teacher=str(other), distill_weight=1.0, max_steps=20, lr=3e-3),
                      tmp_path / "other-run", init_from=base)
    kls = []
    while trainer.step < 20:
        trainer.train_step()
        trainer.step += 1
        kls.append(trainer.distill_loss)
    first, last = sum(kls[:3]) / 3, sum(kls[-5:]) / 5  # per-batch KLs are noisy: means
    assert first > 0.01 and last < 0.5 * first, kls
