import numpy as np
import pytest
import torch

from latentformer.data.dataset import RandomWindows, TokenData, eval_batches

N = 1000
TOKENS = np.arange(N, dtype=np.uint16)  # token value == position: windows reveal where they came from


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_shifted(x, y):
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
    assert torch.equal(y, x + 1)  # y[t] is the token after x[t] in the data: never wrapped


def test_random_windows_shapes_and_no_wrap():
    it = RandomWindows(TOKENS, batch_size=8, block_size=32, seed=1)
    for x, y in _take(it, 200):
        assert x.shape == (8, 32)
        _assert_shifted(x, y)
        assert int(y.max()) <= N - 1 and int(x.min()) >= 0
    # the last start (N - T - 1) is reachable: near-uniform coverage of starts
    starts = torch.cat([next(it)[0][:, 0] for _ in range(2000)])
    assert int(starts.max()) == N - 33 and int(starts.min()) == 0


def test_random_windows_resume():
    ref = RandomWindows(TOKENS, 4, 16, seed=3)
    first = _take(ref, 5)
    state = ref.state_dict()
    rest = _take(ref, 5)
    resumed = RandomWindows(TOKENS, 4, 16, seed=3)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, _take(resumed, 5)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    again = RandomWindows(TOKENS, 4, 16, seed=3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, _take(again, 5)))  # deterministic from seed
    with pytest.raises(ValueError, match="does not match"):
        RandomWindows(TOKENS, 4, 16, seed=4).load_state_dict(state)
    # a state written when the loader also recorded its rank (always 0 of 1) resumes the same stream
    resumed = RandomWindows(TOKENS, 4, 16, seed=3)
    resumed.load_state_dict({**state, "rank": 0, "world_size": 1})
    assert torch.equal(next(resumed)[0], rest[0][0])


@pytest.mark.parametrize("n, B, T", [(1000, 4, 32), (33, 2, 32), (97, 3, 8), (2, 5, 4)])
def test_eval_batches_cover_every_target_once(n, B, T):
    toks = np.arange(n, dtype=np.uint32)
    seen, total = [], 0
    for x, y, n_valid in eval_batches(toks, B, T):
        assert x.shape[1] == T and x.shape[0] <= B and x.dtype == torch.int64
        valid = y != -100
        assert int(valid.sum()) == n_valid
        assert torch.equal(y[valid], x[valid] + 1)
        seen.append(y[valid])
        total += n_valid
    assert total == n - 1
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(1, n))


def test_eval_loss_equals_full_sequence_mean():
    # Summing cross-entropy over eval batches / total n_valid == mean over all targets.
    torch.manual_seed(0)
    toks = np.random.default_rng(0).integers(0, 11, 150).astype(np.uint16)
    table = torch.randn(11, 11)
    s, n = 0.0, 0
    for x, y, nv in eval_batches(toks, 4, 16):
        s += torch.nn.functional.cross_entropy(table[x].reshape(-1, 11), y.reshape(-1), ignore_index=-100, reduction="sum").item()
        n += nv
    t = torch.from_numpy(toks.astype(np.int64))
    ref = torch.nn.functional.cross_entropy(table[t[:-1]], t[1:]).item()
    assert abs(s / n - ref) < 1e-5


def test_bad_loader_args():
    with pytest.raises(ValueError, match="too few"):
        RandomWindows(TOKENS[:10], 2, 10, seed=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        RandomWindows(TOKENS, 0, 10, seed=0)


def test_tokendata_with_loaders(sotu_gpt2):
    out, meta = sotu_gpt2
    data = TokenData(out)
    assert data.tokenizer.kind == "gpt2" and data.vocab_size == 50257
    x, y = next(RandomWindows(data.tokens("train"), 2, 64, seed=0))
    assert x.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])
    split = meta["splits"]["val"]
    assert data.bytes_per_token("val") == split["bytes"] / split["tokens"]
    n = sum(nv for _, _, nv in eval_batches(data.tokens("val"), 8, 256))
    assert n == meta["splits"]["val"]["tokens"] - 1
