"""The training loop: learning, exact resume, early stopping, atomic checkpoints, non-finite steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentformer.checkpoint import load_model, save_checkpoint
from latentformer.config import ModelConfig
from latentformer.data.tokenizer import load_tokenizer
from latentformer.model.transformer import ModelOutput, Transformer
from latentformer.train.trainer import NonFiniteError, Trainer

from .conftest import TINY_MODEL, run_config


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loss_falls_on_sotu(sotu_dir, tmp_path, optimizer):
    cfg = run_config(sotu_dir, max_steps=60, batch_tokens=1024, micro_batch_size=16, eval_interval=30, warmup_steps=5,
                     optimizer=optimizer)
    trainer = Trainer(cfg, tmp_path / "run")
    initial = trainer.evaluate()["loss"]
    summary = trainer.fit()
    assert initial == pytest.approx(math.log(512), abs=0.3)  # a fresh model is near uniform
    assert summary["val"]["loss"] < initial - 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if not r.get("eval")]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(train[0]) and "distill_loss" not in train[0]  # no teacher
    assert [r["step"] for r in records if r.get("eval")] == [30, 60]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer,teacher", [("adamw", False), ("muon", False), ("muon-moe", False), ("adamw", True)])
def test_kill_and_resume_is_bit_identical(sotu_dir, tmp_path, optimizer, teacher):
    optimizer, _, moe = optimizer.partition("-")
    cfg = run_config(sotu_dir, max_steps=10, checkpoint_interval=4, eval_interval=5, optimizer=optimizer)
    if moe:  # Muon's routed-expert stacks (3-D momenta) resume too
        cfg.model = cfg.model.replace(n_routed_experts=4, experts_per_token=2, moe_d_ff=32, first_k_dense_layers=1)
    if teacher:  # the resumed run loads the teacher again
        cfg.train.teacher = str(save_checkpoint(tmp_path / "teacher", Transformer(ModelConfig(**{**TINY_MODEL, "init_std": 0.1})),
                                                load_tokenizer(sotu_dir)))
        cfg.train.distill_weight = 0.7
    cfg.model.dropout = 0.1  # dropout draws from the torch RNG: resume must restore it
    full = Trainer(cfg, tmp_path / "a")
    full.fit()

    def crash(trainer, step):
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(cfg, tmp_path / "b", on_step=[crash]).fit()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["best", "step_4"]
    resumed = Trainer(cfg, tmp_path / "b", resume=True)
    assert resumed.step == 4
    resumed.fit()
    a, b = weights(full.model), weights(resumed.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    sa, sb = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    assert all(sa["state"][i].keys() == sb["state"][i].keys() and all(torch.equal(v, sb["state"][i][k]) for k, v in sa["state"][i].items())
               for i in sa["state"])
    assert any("momentum_buffer" in s for s in sa["state"].values()) == (optimizer == "muon")
    assert any(s.get("momentum_buffer", torch.empty(0)).dim() == 3 for s in sa["state"].values()) == bool(moe)
    # keep_last=2: only the newest two step checkpoints remain
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["best", "step_10", "step_8"]


def test_bookkeeping_does_not_change_the_weights(sotu_dir, tmp_path):
    """What compare lets cells differ in (when and what is saved or logged) leaves the trained
    weights and the evaluations bit-identical; without save_best there is no best/ checkpoint."""
    from latentformer.compare.runner import BOOKKEEPING

    a = run_config(sotu_dir, max_steps=10, checkpoint_interval=4, eval_interval=5)
    b = run_config(sotu_dir, max_steps=10, checkpoint_interval=0, eval_interval=5, save_best=False, log_interval=3,
                   keep_last=1, checkpoint_minutes=0.0, progress=False, tensorboard=False)
    assert {k for k in a.train.__dataclass_fields__ if getattr(a.train, k) != getattr(b.train, k)} <= BOOKKEEPING
    first, second = Trainer(a, tmp_path / "a"), Trainer(b, tmp_path / "b")
    first.fit()
    second.fit()
    wa, wb = weights(first.model), weights(second.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    def evals(run):
        return [(r["step"], r["loss"], r["best"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]

    assert evals(tmp_path / "a") == evals(tmp_path / "b") and evals(tmp_path / "b")[-1][2]
    assert (tmp_path / "a" / "checkpoints" / "best").is_dir()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_10"]


def test_early_stopping_triggers(sotu_dir, tmp_path):
    # lr 0 after warmup: the val loss stops improving, patience 2 stops at the third eval
    cfg = run_config(sotu_dir, max_steps=100, schedule="step", milestones=[1], gamma=1e-30, warmup_steps=1,
                     eval_interval=2, early_stopping_patience=2)
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["stop_reason"] == "early_stopping"
    assert summary["step"] == 6
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step_6").is_dir()


def test_interrupted_checkpoint_write_leaves_previous_loadable(sotu_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(run_config(sotu_dir, max_steps=2), run)
    trainer.fit()
    before = weights(load_model(run / "checkpoints" / "step_2"))

    import latentformer.checkpoint as checkpoint

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_write)
    trainer.step = 3
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    entries = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert entries == ["best", "step_2"]  # no partial step_3, no temporary directory
    after = weights(load_model(run / "checkpoints" / "step_2"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def _nan_forward_on(steps: set[int], counter: list[int]):
    real = Transformer.forward

    def forward(self, tokens, targets=None, **kwargs):
        out = real(self, tokens, targets, **kwargs)
        if targets is not None and self.training:
            counter[0] += 1
            if counter[0] in steps:
                return ModelOutput(out.loss * float("nan"), out.aux_loss)
        return out

    return forward


def test_nonfinite_step_is_skipped_and_counted(sotu_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Transformer, "forward", _nan_forward_on({3}, [0]))
    trainer = Trainer(run_config(sotu_dir, max_steps=5), tmp_path / "run")
    before = {}

    def snapshot(t, step):
        before[step] = weights(t.model)

    trainer.on_step.append(snapshot)
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1
    assert all(torch.equal(before[2][k], before[3][k]) for k in before[2])  # step 3 changed nothing
    assert not all(torch.equal(before[3][k], before[4][k]) for k in before[3])  # training went on


def test_consecutive_nonfinite_steps_stop_the_run(sotu_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Transformer, "forward", _nan_forward_on(set(range(2, 100)), [0]))
    trainer = Trainer(run_config(sotu_dir, max_steps=20, max_nonfinite_steps=3), tmp_path / "run")
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps at step 4"):
        trainer.fit()
    assert trainer.skipped_steps == 3


def test_nonfinite_cli_exit_code(sotu_dir, tmp_path, monkeypatch, capsys):
    from latentformer.cli import main

    from .conftest import TINY_MODEL_ARGS

    monkeypatch.setattr(Transformer, "forward", _nan_forward_on(set(range(1, 100)), [0]))
    code = main(["train", "--data", str(sotu_dir), "--out", str(tmp_path / "run"), *TINY_MODEL_ARGS, "--train.device", "cpu",
                 "--train.seq_len", "32", "--train.micro_batch_size", "8", "--train.batch_tokens", "256",
                 "--train.progress", "false", "--train.max_nonfinite_steps", "2", "--no-sample"])
    assert code == 1
    assert "consecutive non-finite steps" in capsys.readouterr().err.strip().splitlines()[-1]


def test_gradients_are_cleared_inside_the_step(sotu_dir, tmp_path):
    """A known defect of earlier trainers: zero_grad outside the step lets gradients of one
    step leak into the next. Here every step (with accumulation inside it) ends holding no
    gradient, so the next step starts from zero."""
    cfg = run_config(sotu_dir, batch_tokens=512)  # grad_accum 2
    trainer = Trainer(cfg, tmp_path / "run")
    for _ in range(2):
        _, norm, finite = trainer.train_step()
        assert finite and norm > 0
        assert all(p.grad is None for p in trainer.model.parameters())


def block_input_dtypes(trainer) -> list[torch.dtype]:
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for blk in trainer.model.layers]
    trainer.train_step()
    for h in hooks:
        h.remove()
    return seen


def test_low_precision_residual_carries_the_stream_in_the_autocast_dtype(sotu_dir, tmp_path):
    """bf16 autocast: the residual stream is bf16 by default (low_precision_residual) and fp32 without;
    the first step's loss agrees to bf16 accuracy and the run still learns."""
    base = Trainer(run_config(sotu_dir, dtype="bf16", low_precision_residual=False), tmp_path / "a")
    low = Trainer(run_config(sotu_dir, dtype="bf16", max_steps=30), tmp_path / "b")
    assert set(block_input_dtypes(base)) == {torch.float32}
    assert set(block_input_dtypes(low)) == {torch.bfloat16}
    torch.manual_seed(0)
    x = torch.randint(0, 512, (4, 32))
    with base._autocast(), torch.no_grad():
        want = base.model(x, x).loss
        got = low.model(x, x).loss
    assert got.item() == pytest.approx(want.item(), rel=2e-2)  # both models drew the same init, one step each
    start = low.evaluate()["loss"]
    assert low.fit()["val"]["loss"] < start - 0.5


def test_mtp_weight_enters_the_objective_and_the_checkpoint_serves_without_the_modules(sotu_dir, tmp_path):
    """Depth 1 with mtp_weight 0 trains the main weights exactly as depth 0 does (the same initial
    values; the module's loss has no weight); with mtp_weight 0.3 they differ. The checkpoint loads
    and generates (the decode layer never calls the modules)."""
    from latentformer.checkpoint import load
    from latentformer.infer.generate import generate

    def main_weights(depth, mtp_weight, name):
        cfg = run_config(sotu_dir, max_steps=3, mtp_weight=mtp_weight)
        cfg.model.mtp_depth = depth
        trainer = Trainer(cfg, tmp_path / name)
        trainer.fit()
        return {k: v for k, v in weights(trainer.model).items() if not k.startswith("mtp.")}

    plain, unweighted, weighted = main_weights(0, 0.3, "plain"), main_weights(1, 0.0, "zero"), main_weights(1, 0.3, "mtp")
    assert plain.keys() == unweighted.keys() == weighted.keys()
    assert all(torch.equal(plain[k], unweighted[k]) for k in plain)
    assert not all(torch.equal(plain[k], weighted[k]) for k in plain)
    model, tokenizer = load(tmp_path / "mtp")
    assert model.config.mtp_depth == 1
    assert isinstance(generate(model, tokenizer, "My fellow citizens,", max_new_tokens=5, temperature=0), str)
