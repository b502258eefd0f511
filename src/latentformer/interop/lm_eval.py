"""An lm-evaluation-harness model: `LatentformerLM`, registered as "latentformer".

The harness's `LM` interface on a latentformer checkpoint (`latentformer.load`):
- `loglikelihood`: (context, continuation) pairs tokenized as the harness does for causal models
  (`TemplateLM._encode_pair`: trailing spaces of the context move to the continuation, the pair is
  encoded whole and split at the context's length; an empty context is the end-of-text token),
  scored in batches of right-padded rows (causal attention: the padding never reaches the scored
  positions); the context is cut from the left to fit `max_length`. Returns (sum of the
  continuation's log-probabilities, whether greedy decoding would produce it).
- `loglikelihood_rolling`: a whole text in the harness's disjoint windows of `max_length` tokens
  (`get_rolling_token_windows` + `make_disjoint_window`, the end-of-text token as prefix), summed.
- `generate_until`: `latentformer.generate` (batched prompts on the latent KV cache) with the
  request's `until` strings as stops and `max_gen_toks` new tokens (the prompt cut from the left to fit
  max_seq_len); greedy unless `do_sample` is true (then temperature, top_k, top_p, min_p,
  repetition_penalty, seed as given), as the harness's Hugging Face model does.

Log-probabilities are over the model's whole (possibly padded) vocabulary, as `latentformer eval`'s
perplexity. MoE with capacity_factor > 0 drops assignments per batch, so there a score depends on
its batch companions (batch_size=1 removes that).

`lm_eval` is imported here only: the package does not need it (pip install 'latentformer[eval]').
Importing this module registers the model, so `lm_eval.simple_evaluate(model="latentformer",
model_args="path=RUN", ...)` works after it; `python -m latentformer.interop.lm_eval run --model
latentformer --model_args path=RUN --tasks ...` is the harness's own command line with the model
registered.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@register_model("latentformer")
class LatentformerLM(TemplateLM):
    """A latentformer model for the harness: `LatentformerLM(path=RUN)` or `LatentformerLM(model=m, tokenizer=t)`.

    batch_size: rows per forward (loglikelihood) and prompts per `generate` call; max_length: the
    context window for scoring (default: the checkpoint's training context, else max_seq_len);
    device: auto | cpu | cuda | ...; dtype: fp32 | bf16 (autocast)."""

    def __init__(self, path: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | str | None = None, device: str | None = None, dtype: str = "fp32",
                 max_batch_size=None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"latentformer model: unknown argument(s) {', '.join(sorted(kwargs))} "
                             "(expected path, batch_size, max_length, device, dtype)")
        if (path is None) == (model is None):
            raise ValueError("latentformer model: give path=RUN (a checkpoint or run directory), or model= and tokenizer=")
        train_seq_len = None
        if path is not None:
            import json

            from latentformer.checkpoint import CONFIG, find_checkpoint, load
            from latentformer.cli.generate import check_device
            from latentformer.train.distributed import best_device

            if device not in (None, "auto") and str(device).startswith("cuda") and not torch.cuda.is_available():
                # the harness's command line passes device="cuda:0" unless told otherwise (its HF model falls back too)
                import sys

                print(f"latentformer model: device {device} unavailable (no CUDA), using {best_device()}", file=sys.stderr)
                device = None
            device = best_device() if device in (None, "auto") else check_device(device)
            ckpt = find_checkpoint(path)
            model, tokenizer = load(ckpt, device=device)
            train_seq_len = json.loads((ckpt / CONFIG).read_text()).get("train_seq_len")
        elif tokenizer is None:
            raise ValueError("latentformer model: model= needs tokenizer= too")
        if str(batch_size).startswith("auto"):
            batch_size = 8  # no memory probing: a fixed default
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"latentformer model: batch_size must be >= 1, got {batch_size}")
        self.max_length = int(max_length or train_seq_len or model.config.max_seq_len)
        if not 0 < self.max_length <= model.config.max_seq_len:
            raise ValueError(f"latentformer model: max_length must be in [1, {model.config.max_seq_len}], got {max_length}")
        self._device = next(model.parameters()).device
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"latentformer model: dtype must be fp32 or bf16, got {dtype!r}")
        self._autocast = ((lambda: torch.autocast(self._device.type, dtype=torch.bfloat16)) if dtype == "bf16"
                          else contextlib.nullcontext)

    # -- tokenization (TemplateLM) -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def tokenizer_name(self) -> str:
        return f"latentformer-{self.tokenizer.kind}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(sum logprob, is_greedy) of each continuation given its context, in `pairs` order.

        Rows are sorted longest first and right-padded into batches of `batch_size`."""
        from tqdm import tqdm

        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                rows.append((i, [], 0))
                continue
            if len(cont) > self.max_length:
                raise ValueError(f"latentformer model: a continuation of {len(cont)} tokens does not fit the context "
                                 f"max_length={self.max_length}")
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]  # the inputs that predict every continuation token
            rows.append((i, inp, len(cont)))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        todo = sorted((r for r in rows if r[2]), key=lambda r: -len(r[1]))
        for start in tqdm(range(0, len(todo), self.batch_size), disable=disable_tqdm, desc="latentformer loglikelihood"):
            batch = todo[start:start + self.batch_size]
            T = len(batch[0][1])
            tokens = torch.full((len(batch), T), self.eot_token_id, dtype=torch.long, device=self._device)
            for b, (_, inp, _) in enumerate(batch):
                tokens[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            with self._autocast():
                logits = self.model(tokens)
            for b, (i, inp, n) in enumerate(batch):
                ctx, cont = pairs[i]
                target = torch.tensor(cont[-n:], dtype=torch.long, device=self._device)
                logprobs = F.log_softmax(logits[b, len(inp) - n:len(inp)].float(), dim=-1)
                greedy = bool((logprobs.argmax(-1) == target).all())
                results[i] = (float(logprobs.gather(-1, target[:, None]).sum()), greedy)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, req in enumerate(requests):
            (text,) = req.args[:1]
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, self._score(windows, disable_tqdm)):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import latentformer as lf

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for indices in groups.values():
            kw = dict(requests[indices[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_new = int(kw.pop("max_gen_toks", 256))
            max_new = max(1, min(max_new, self.model.config.max_seq_len - 1))
            do_sample = _bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
            if not do_sample:
                temperature = 0.0
            sampling = dict(temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
                            top_p=float(kw.pop("top_p", 1.0) or 1.0), min_p=float(kw.pop("min_p", 0.0) or 0.0),
                            repetition_penalty=float(kw.pop("repetition_penalty", 1.0) or 1.0))
            seed = kw.pop("seed", None)
            if kw:
                warnings.warn(f"latentformer model: generation arguments {', '.join(sorted(kw))} are not supported "
                              "and were ignored", stacklevel=2)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                with self._autocast():
                    texts = lf.generate(self.model, self.tokenizer, [requests[i].args[0] for i in chunk],
                                        max_new_tokens=max_new, stop=until or None, truncate=True,
                                        seed=None if seed is None else int(seed), **sampling)
                for i, text in zip(chunk, texts):
                    for s in until:  # generate cuts at a stop already; the harness's contract, kept explicit
                        text = text.split(s)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


if __name__ == "__main__":  # the harness's command line, with "latentformer" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
