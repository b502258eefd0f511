"""The report's reading of timings, on synthetic numbers: which figures are flagged as noise, how
the tables show them, and the interleaved order of the decode rounds (no real timing here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from latentformer.compare import measure, report


@pytest.mark.parametrize("values, flagged", [
    ([1000.0, 1010.0, 990.0, 1005.0, 995.0], None),               # CV 0.8%: a result
    ([1284.0, 12.0, 1250.0, 1300.0, 1270.0], "spread"),           # one round on busy cores
    ([2818.0, 6000.0, 400.0], "spread"),                          # issue 36: "2,818 ± 3,170"
    ([1000.0, 1090.0, 910.0], None),                              # CV 9%: under the 10% line
    ([1000.0, 1120.0, 880.0], "spread"),                          # CV 12%
    ([1000.0, 1001.0], "fewer than 3"),                           # too few repeats to know
    ([1000.0], "1 sample,"),
])
def test_noise_flag(values, flagged):
    flag = report.noise_flag(values)
    assert flag is None if flagged is None else flagged in flag


def test_timing_reports_the_median_and_flags_it():
    t = report.timing([1284.0, 12.0, 1250.0, 1300.0, 1270.0])
    assert t["median"] == 1270.0 and t["n"] == 5 and t["cv"] == pytest.approx(t["std"] / t["mean"])
    assert "spread 55% of the mean" in t["flag"]
    assert report._timed(t) == "1,270 (noisy)"
    assert report._timed(report.timing([1000.0, 1010.0, 990.0])) == "1,000"
    assert report.timing([]) is None and report._timed(None) == "–"


def test_decode_rounds_interleave_the_variants(monkeypatch):
    """Each round times every (variant, mode) once at a point, in a rotated order; the samples of a
    point are the rounds' timings, and a point that does not fit is None."""
    calls = []

    configs = {name: SimpleNamespace(attention=name) for name in ("mha", "mla")}  # all decode_samples reads
    monkeypatch.setattr(measure, "_decode_model", lambda cfg, n, device, dtype: cfg.attention)
    step_seconds = iter(0.001 * (i + 1) for i in range(1000))

    def sample(model, batch, context, mode, device, min_seconds):
        calls.append((model, mode, batch, context))
        return None if context == 64 and mode == "naive" else batch / next(step_seconds)

    monkeypatch.setattr(measure, "_sample", sample)
    rows = measure.decode_samples(configs, [16, 64], [2], torch.device("cpu"), rounds=3)
    first_point = [(m, mode) for m, mode, b, c in calls if c == 16]
    entries = [("mha", "standard"), ("mla", "absorb"), ("mla", "naive")]
    assert first_point == entries + entries[1:] + entries[:1] + entries[2:] + entries[:2]
    by = {(r["variant"], r["mode"], r["context"]): r["tokens_per_s"] for r in rows}
    assert by[("mha", "standard", 16)] == pytest.approx([2 / 0.001, 2 / 0.006, 2 / 0.008])
    assert by[("mla", "naive", 64)] is None  # tried once, not again
    assert sum(1 for m, mode, b, c in calls if (m, mode, c) == ("mla", "naive", 64)) == 1


def test_decode_rows_come_from_decode_json_else_from_cells_finished_before_it():
    decode = {"rows": [{"variant": "mla", "mode": "absorb", "batch_size": 1, "context": 16, "tokens_per_s": [100.0, 101.0, 99.0]},
                       {"variant": "mla", "mode": "naive", "batch_size": 1, "context": 16, "tokens_per_s": None}]}
    legacy = [{"decode": [{"mode": "absorb", "batch_size": 1, "context": 16, "tokens_per_s": 80.0}]}]
    absorb, naive = report._decode(decode, "mla", legacy)
    assert absorb["tokens_per_s"]["median"] == 100.0 and absorb["tokens_per_s"]["flag"] is None
    assert naive["tokens_per_s"] is None  # did not fit
    (old,) = report._decode(decode, "mha", legacy)  # a variant decode.json does not hold: its cell's one timing
    assert old["tokens_per_s"]["values"] == [80.0] and "1 sample" in old["tokens_per_s"]["flag"]


def _variant(name, curve, tokens_per_s, overrides=None):
    """A results variant with the fields the reference comparison reads: its mean curve (tokens, loss)
    over seeds, its final loss (the curve's last point) and its median window speed."""
    return {"name": name, "train_overrides": overrides or {},
            "curve": [{"tokens": t, "loss": report.stat([loss])} for t, loss in curve],
            "val_loss": report.stat([curve[-1][1]]), "train_tokens_per_s": report.timing([tokens_per_s] * 3),
            "train_device": "NVIDIA H100 80GB HBM3"}


def test_tokens_to_a_loss_and_the_loss_at_tokens_interpolate_the_curve():
    curve = [(10, 4.0), (20, 3.0), (30, 2.5), (40, 2.0)]
    assert report.tokens_to_loss(curve, 2.75) == pytest.approx(25.0)
    assert report.tokens_to_loss(curve, 4.5) == 10.0  # already there at the first evaluation
    assert report.tokens_to_loss(curve, 1.9) is None  # never reached
    assert report.tokens_to_loss([(10, 3.0), (20, 2.0), (30, 2.6), (40, 1.0)], 2.5) == pytest.approx(15.0)  # the first crossing
    assert report.loss_at_tokens(curve, 35) == pytest.approx(2.25)
    assert report.loss_at_tokens(curve, 50) == 2.0 and report.loss_at_tokens(curve, 5) == 4.0


def test_a_variant_against_the_reference():
    # reference: 40 tokens, final 2.0 at 100 tok/s (0.4 s); the variant reaches 2.0 at 30 tokens and runs at 80 tok/s
    ref = _variant("mla", [(10, 4.0), (20, 3.0), (30, 2.5), (40, 2.0)], 100.0)
    fast_learner = _variant("mla:train.optimizer=muon", [(10, 4.0), (20, 2.5), (30, 2.0), (40, 1.8)], 80.0,
                            {"optimizer": "muon"})
    r = report.against_reference(fast_learner, ref)
    assert r["reference"] == "mla" and r["val_loss_delta"] == pytest.approx(-0.2)
    assert r["tokens_to_reference_loss"] == pytest.approx(30.0) and r["tokens_ratio"] == pytest.approx(0.75)
    assert r["speed_ratio"] == pytest.approx(0.8)
    assert r["time_ratio"] == pytest.approx(0.9375)  # 30 / 80 s against 40 / 100 s
    assert r["tokens_at_reference_time"] == pytest.approx(32.0)  # 0.4 s at 80 tok/s
    assert r["val_loss_at_reference_time"] == pytest.approx(1.96)
    # faster than the reference and never reaching its loss: the time ratio is unknown, and after the
    # reference's time it has finished (its own tokens and final loss)
    slow_learner = _variant("mqa", [(10, 4.2), (20, 3.5), (30, 2.9), (40, 2.4)], 125.0)
    r = report.against_reference(slow_learner, ref)
    assert r["tokens_to_reference_loss"] is None and r["tokens_ratio"] is None and r["time_ratio"] is None
    assert r["speed_ratio"] == pytest.approx(1.25)
    assert r["tokens_at_reference_time"] == 40 and r["val_loss_at_reference_time"] == pytest.approx(2.4)
    # no speed (a cell without windows), or speeds of two GPU models: only the loss and the tokens
    for ref_unspeeded in ({**ref, "train_tokens_per_s": None}, {**ref, "train_device": "NVIDIA H200"}):
        r = report.against_reference(fast_learner, ref_unspeeded)
        assert r["tokens_ratio"] == pytest.approx(0.75) and r["speed_ratio"] is None and r["val_loss_at_reference_time"] is None


def test_the_reference_is_the_familys_when_compared_else_the_first():
    a, b = _variant("mha", [(10e6, 3.0), (20e6, 2.0)], 120.0), _variant("mla", [(10e6, 3.0), (20e6, 2.1)], 100.0)
    assert report.reference_variant([a, b], "mla") is b
    assert report.reference_variant([a, b], "gqa") is a
    unfinished = {**b, "curve": [], "val_loss": None}
    assert report.reference_variant([a, unfinished], "mla") is None  # one measured variant: nothing to compare
    head, rows = report.reference_table({"variants": [{**b, "vs_reference": None},
                                                      {**a, "vs_reference": report.against_reference(a, b)}]})
    assert head[2] == "val loss vs mla" and head[3] == "tokens to mla's final loss"
    assert rows == [["mha", "common recipe", "-0.1000 (-4.8%)", "19.0M (0.95x)", "1.20x", "0.79x", "2.0000 (at 20.0M)"]]
