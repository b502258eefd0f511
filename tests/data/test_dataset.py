import numpy as np
import pytest
import torch

from latentformer.data.dataset import RandomWindows, SequentialWindows, TokenData, eval_batches

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


def test_random_windows_ranks_and_resume():
    a = RandomWindows(TOKENS, 4, 16, seed=3, rank=0, world_size=2)
    b = RandomWindows(TOKENS, 4, 16, seed=3, rank=1, world_size=2)
    xa, xb = torch.cat([x for x, _ in _take(a, 20)]), torch.cat([x for x, _ in _take(b, 20)])
    assert not torch.equal(xa, xb)
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


def test_sequential_stride_equals_block_covers_each_target_once():
    T, B = 10, 3
    it = SequentialWindows(TOKENS, B, T)
    W = (N - T - 1) // T + 1
    assert len(it) == W == 99
    xs, ys = [], []
    for x, y in _take(it, W // B):
        _assert_shifted(x, y)
        xs.append(x)
        ys.append(y)
    targets = torch.cat(ys).flatten()
    assert torch.equal(targets.sort().values, torch.arange(1, W * T + 1))  # each position once
    assert torch.equal(torch.cat(xs)[:, 0], torch.arange(0, W * T, T))  # in order
    # the epoch loops: the next batch starts again at window 0
    x, _ = next(it)
    assert x[0, 0] == 0 and it.epoch == 1


def test_sequential_overlap():
    T, S = 10, 4
    it = SequentialWindows(TOKENS, 1, T, stride=S)
    W = (N - T - 1) // S + 1
    assert len(it) == W
    ys = torch.cat([y for _, y in _take(it, W)]).flatten()
    counts = torch.bincount(ys, minlength=N)
    # position p is a target of windows k with k*S+1 <= p <= k*S+T
    for p in range(N):
        k_lo, k_hi = max(0, -(-(p - T) // S)), min(W - 1, (p - 1) // S)
        assert counts[p] == max(0, k_hi - k_lo + 1), p
    interior = counts[T : W * S]
    assert int(interior.min()) == T // S and int(interior.max()) == -(-T // S)  # floor/ceil(T/S) overlaps
    assert counts[0] == 0 and int(counts.sum()) == W * T


@pytest.mark.parametrize("shuffle", [False, True])
def test_sequential_ranks_disjoint_and_resume(shuffle):
    T, B, world = 8, 2, 3
    per_rank = []
    for r in range(world):
        it = SequentialWindows(TOKENS, B, T, seed=5, rank=r, world_size=world, shuffle=shuffle)
        n = len(it) // B
        per_rank.append({int(s) for x, _ in _take(it, n) for s in x[:, 0]})
    assert all(not (per_rank[i] & per_rank[j]) for i in range(world) for j in range(i + 1, world))
    ref = SequentialWindows(TOKENS, B, T, seed=5, rank=1, world_size=world, shuffle=shuffle)
    _take(ref, 17)  # crosses an epoch boundary (len 41 per rank)
    state = ref.state_dict()
    rest = _take(ref, 30)
    resumed = SequentialWindows(TOKENS, B, T, seed=5, rank=1, world_size=world, shuffle=shuffle)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, _take(resumed, 30)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        _assert_shifted(x1, y1)


def test_shuffle_changes_order_per_epoch_but_covers_all():
    it = SequentialWindows(TOKENS, 1, 10, seed=0, shuffle=True)
    e0 = [int(next(it)[0][0, 0]) for _ in range(len(it))]
    e1 = [int(next(it)[0][0, 0]) for _ in range(len(it))]
    assert sorted(e0) == sorted(e1) == list(range(0, 990, 10)) and e0 != e1


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
    with pytest.raises(ValueError, match="rank"):
        SequentialWindows(TOKENS, 2, 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="stride"):
        SequentialWindows(TOKENS, 2, 10, stride=0)


def test_tokendata_with_loaders(sotu_gpt2):
    out, meta = sotu_gpt2
    data = TokenData(out)
    assert data.tokenizer.kind == "gpt2" and data.vocab_size == 50257
    x, y = next(RandomWindows(data.tokens("train"), 2, 64, seed=0))
    assert x.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])
    bpb = data.bits_per_byte(3.0, "val")
    assert bpb == pytest.approx(3.0 / np.log(2) / data.bytes_per_token("val"))
    n = sum(nv for _, _, nv in eval_batches(data.tokens("val"), 8, 256))
    assert n == meta["splits"]["val"]["tokens"] - 1
