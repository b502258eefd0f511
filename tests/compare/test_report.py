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
