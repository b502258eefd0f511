"""The serving batch sized to the device and the model when --max-batch is not given."""

from __future__ import annotations

from latentformer.serve.sizing import default_max_batch

from .test_engine import CONTEXT, tiny_model


def test_cpu_default_and_memory_cap():
    model, _ = tiny_model("mla")
    row = model.kv_cache_bytes_per_token() * CONTEXT
    assert default_max_batch(model, available=1 << 40) == (4, "the CPU default; --max-batch to change")
    rows, why = default_max_batch(model, available=4 * 2 * row)  # a quarter of it holds 2 rows
    assert rows == 2 and why.startswith("25% of the") and f"holds 2 rows of {CONTEXT} tokens" in why
    assert default_max_batch(model, available=row)[0] == 1  # never below one row
    assert default_max_batch(model)[0] >= 1  # this machine's memory
