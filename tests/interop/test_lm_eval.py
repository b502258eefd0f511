"""The lm-evaluation-harness model (`latentformer.interop.lm_eval`) and `eval --tasks`: the local tasks in
tests/data/lm_eval run offline through `simple_evaluate`, and each request type against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

import latentformer as lf  # noqa: E402
from latentformer.checkpoint import save_checkpoint  # noqa: E402
from latentformer.cli import main  # noqa: E402
from latentformer.data.tokenizer import load_tokenizer  # noqa: E402
from latentformer.interop.lm_eval import LatentformerLM  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASKS = "tests/data/lm_eval"  # the task YAMLs name their jsonl relative to the repository root
CFG = dict(vocab_size=260, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, d_ff=48, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, init_std=0.2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model, tok = lf.Transformer(lf.ModelConfig(**CFG)).eval(), load_tokenizer("byte")
    return save_checkpoint(tmp_path_factory.mktemp("lmeval") / "model", model, tok)


@pytest.fixture(scope="module")
def lm(ckpt):
    return LatentformerLM(path=str(ckpt), batch_size=3, device="cpu")


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _by_hand(model, inputs: list[int], targets: list[int]) -> tuple[float, bool]:
    """Sum of log_softmax of the model's logits at the last len(targets) positions of `inputs`, and greedy."""
    with torch.no_grad():
        logits = model(torch.tensor([inputs]))[0, len(inputs) - len(targets):]
    logprobs = F.log_softmax(logits.double(), dim=-1)
    t = torch.tensor(targets)
    return float(logprobs[torch.arange(len(t)), t].sum()), bool((logprobs.argmax(-1) == t).all())


def test_registered_under_latentformer():
    from lm_eval.api.registry import get_model

    assert get_model("latentformer") is LatentformerLM


def test_loglikelihood_is_the_hand_computed_sum(lm):
    tok, model = lm.tokenizer, lm.model
    pairs = [("The sky is", " blue"), ("A", " longer continuation here"), ("Two plus two is ", "four"),
             ("", "no context")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (context, cont), (logprob, greedy) in zip(pairs, got):
        if not context:
            ctx_ids, cont_ids = [tok.eot_id], tok.encode(cont)
        else:
            n = len(context) - len(context.rstrip())  # the harness moves trailing spaces to the continuation
            context, cont = (context[:-n], context[-n:] + cont) if n else (context, cont)
            ctx_ids, cont_ids = tok.encode(context), tok.encode(cont)
        want, want_greedy = _by_hand(model, (ctx_ids + cont_ids)[:-1], cont_ids)
        assert logprob == pytest.approx(want, abs=1e-5)
        assert greedy == want_greedy


def test_is_greedy_true_for_the_models_own_greedy_continuation(lm):
    context, ids, greedy_ids = "Hello", lm.tokenizer.encode("Hello"), []
    with torch.no_grad():  # greedy by hand, over the vocabulary the scores use (the model's)
        for _ in range(6):
            greedy_ids.append(int(lm.model(torch.tensor([ids + greedy_ids]))[0, -1].argmax()))
    other = greedy_ids[:-1] + [(greedy_ids[-1] + 1) % 256]
    # token level (TemplateLM's entry below the text): greedy bytes need not be valid UTF-8 text
    (_, greedy), (_, not_greedy) = lm._loglikelihood_tokens([(None, ids, greedy_ids), (None, ids, other)])
    assert greedy and not not_greedy


def test_loglikelihood_rolling_over_a_text_longer_than_the_context(ckpt):
    lm = LatentformerLM(path=str(ckpt), batch_size=2, max_length=16, device="cpu")
    text = "A text that is much longer than sixteen tokens, so it spans several windows."
    toks = lm.tokenizer.encode(text)
    assert len(toks) > 3 * 16
    seq = [lm.tokenizer.eot_id] + toks  # seq[i + 1] == toks[i]
    want, prev = 0.0, 0
    for end in list(range(16, len(toks), 16)) + [len(toks)]:  # each window predicts toks[prev:end]
        start = max(0, end - 16)
        want += _by_hand(lm.model, seq[start:end], toks[prev:end])[0]
        prev = end
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_is_generate_cut_at_the_stop(lm):
    prompt = "Q: Say hello.\nA:"
    full = lf.generate(lm.model, lm.tokenizer, prompt, max_new_tokens=20, temperature=0)
    stop = next((ch for ch in full[2:] if ch.isprintable() and ch != "\ufffd"), None)
    if stop is None:
        pytest.skip("the greedy text has no printable character to stop at")
    want = lf.generate(lm.model, lm.tokenizer, prompt, max_new_tokens=20, temperature=0, stop=stop)
    assert want == full.split(stop)[0]
    got = lm.generate_until([_req("generate_until", prompt, {"until": [stop], "max_gen_toks": 20, "do_sample": False}),
                             _req("generate_until", prompt, {"until": "\x00never", "max_gen_toks": 20})])
    assert got == [want, full]


def test_local_tasks_through_simple_evaluate(lm, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"{TASKS}/tiny_mc.yaml", f"{TASKS}/tiny_gen.yaml"], log_samples=True)
    mc, gen = out["results"]["latentformer_tiny_mc"], out["results"]["latentformer_tiny_gen"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= gen["exact_match,none"] <= 1.0
    # the multiple-choice answer is the choice of highest log-likelihood, as scored above
    docs = [json.loads(line) for line in (ROOT / TASKS / "mc.jsonl").read_text().splitlines()]
    scores = lm.loglikelihood([_req("loglikelihood", d["question"], " " + c) for d in docs for c in d["choices"]])
    acc, i = 0, 0
    for d in docs:
        ll = [s for s, _ in scores[i:i + len(d["choices"])]]
        i += len(d["choices"])
        acc += ll.index(max(ll)) == d["label"]
    assert mc["acc,none"] == pytest.approx(acc / len(docs))
    # the generation task's responses are generate's greedy text, cut at the task's `until`
    for sample in out["samples"]["latentformer_tiny_gen"]:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"] if isinstance(sample["arguments"], dict) else sample["arguments"][0][0]
        want = lf.generate(lm.model, lm.tokenizer, prompt, max_new_tokens=12, temperature=0)
        for s in ("\n", "Q:"):
            want = want.split(s)[0]
        assert sample["resps"][0][0] == want


def test_eval_verb_with_tasks(ckpt, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["eval", str(ckpt), "--tasks", f"{TASKS}/tiny_mc.yaml,{TASKS}/tiny_gen.yaml", "--limit", "2",
                 "--batch-size", "2", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["results"]) == {"latentformer_tiny_mc", "latentformer_tiny_gen"}
    assert out["max_length"] == CFG["max_seq_len"]
    assert main(["eval", str(ckpt), "--tasks", f"{TASKS}/tiny_mc.yaml", "--device", "cpu"]) == 0
    assert "latentformer_tiny_mc" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task_xyz"], "--tasks: Spec 'no_such_task_xyz' is not a registered task"),
    (["--tasks", "arc_easy"], "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set"),
    (["--tasks", "x", "--data", "sotu"], "--data is for perplexity"),
    (["--tasks", "x", "--limit", "2.5"], "--limit must be a whole count"),
])
def test_eval_tasks_errors_are_one_line(ckpt, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", str(ckpt), "--device", "cpu", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_eval_tasks_without_lm_eval_installed(ckpt, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", str(ckpt), "--tasks", "hellaswag"]) != 0
    err = capsys.readouterr().err.strip()
    assert "pip install lm-eval" in err and len(err.splitlines()) == 1, err


def test_harness_by_name_and_its_command_line(ckpt, monkeypatch):
    """`model="latentformer"` with model_args, in process; and the harness's own command line with the model
    registered (`python -m latentformer.interop.lm_eval run --model latentformer ...`)."""
    import os
    import subprocess
    import sys

    monkeypatch.chdir(ROOT)
    out = lm_eval.simple_evaluate(model="latentformer", model_args=f"path={ckpt},batch_size=2,device=cpu",
                                  tasks=[f"{TASKS}/tiny_mc.yaml"], limit=2)
    assert "acc,none" in out["results"]["latentformer_tiny_mc"]
    proc = subprocess.run([sys.executable, "-m", "latentformer.interop.lm_eval", "run", "--model", "latentformer",
                           "--model_args", f"path={ckpt}", "--device", "cpu", "--tasks", f"{TASKS}/tiny_mc.yaml",
                           "--limit", "2"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "latentformer_tiny_mc" in proc.stdout


def test_sampled_generation_and_limits(lm):
    prompt, kw = "Once", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 3}
    want = lf.generate(lm.model, lm.tokenizer, prompt, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3, stop="\n\n")
    assert lm.generate_until([_req("generate_until", prompt, kw)]) == [want]
    with pytest.warns(UserWarning, match="num_beams"):
        lm.generate_until([_req("generate_until", prompt, {"max_gen_toks": 2, "num_beams": 4})])
    with pytest.raises(ValueError, match="does not fit the context"):
        lm._loglikelihood_tokens([(None, [1], list(range(65)))])
