"""The small-batch products' dispatch and launch configuration (the kernel itself:
test_interpreted.py on CPU, the decode step's logits against an fp32 naive decode in benchmarks/decode_throughput.py on the GPU)."""

import pytest
import torch
import torch.nn.functional as F

from latentformer.kernels import decode_gemm
from latentformer.kernels.decode_gemm import launch_config

H100 = dict(sms=132, smem=227 * 1024)
A100 = dict(sms=108, smem=163 * 1024)
RTX4090 = dict(sms=128, smem=99 * 1024)


@pytest.mark.parametrize("N,K,n_weights", [(2080, 768, 1), (768, 1536, 1), (2304, 768, 2), (768, 2304, 1)])
def test_mla_125m_shapes_get_the_measured_tiles(N, K, n_weights):
    # the configuration measured on the H200 (NOTES.md, "Decode", 2026-11-29): 32-row slabs, K tiles of 256, 3 stages
    assert launch_config(64, N, K, n_weights, 2, **H100) == (64, 32, 256, 3, 1)


@pytest.mark.parametrize("N,K,splits", [(768, 1536, 6), (768, 2304, 8), (1280, 4096, 6), (2080, 768, 3), (768, 128, 1)])
def test_split_k_for_narrow_products(N, K, splits):
    # mla-125m's w_out and down, 348m's w_out; a wide product splits less; a K of one tile never splits
    cfg = launch_config(64, N, K, 1, 2, **H100, split_k=True)
    assert cfg.k_splits == splits
    assert cfg.k_splits <= decode_gemm.MAX_K_SPLITS and K // cfg.k_splits >= cfg.block_k
    assert -(-N // cfg.block_n) * cfg.k_splits <= 2 * H100["sms"]
    assert launch_config(64, N, K, 1, 2, **H100).k_splits == 1  # only where the caller asks
    assert launch_config(64, N, K, 2, 2, **H100, split_k=True).k_splits == 1  # never SwiGLU's two weights


@pytest.mark.parametrize("gpu", [H100, A100, RTX4090], ids=["h100", "a100", "rtx4090"])
@pytest.mark.parametrize("M", [1, 17, 32, 64])
@pytest.mark.parametrize("N,K", [(768, 768), (4896, 1280), (1280, 4096), (50304, 768), (64, 48)])
@pytest.mark.parametrize("n_weights", [1, 2])
def test_tiles_fit_in_shared_memory(gpu, M, N, K, n_weights):
    cfg = launch_config(M, N, K, n_weights, 2, **gpu)
    assert cfg.block_m >= max(16, M) and cfg.block_m & (cfg.block_m - 1) == 0
    assert cfg.block_k >= 16 and cfg.num_stages >= 2
    assert cfg.num_stages * (cfg.block_m + n_weights * cfg.block_n) * cfg.block_k * 2 <= gpu["smem"]
    # at most two programs per multiprocessor unless the slabs are already 128 rows wide
    assert -(-N // cfg.block_n) <= 2 * gpu["sms"] or cfg.block_n == 128


def test_cpu_tensors_use_torch():
    x, w, w2 = torch.randn(64, 32), torch.randn(48, 32), torch.randn(48, 32)
    assert not decode_gemm.supported(x, w)
    torch.testing.assert_close(decode_gemm.linear(x, w), F.linear(x, w), rtol=0, atol=0)
    torch.testing.assert_close(decode_gemm.swiglu(x, w, w2), F.silu(F.linear(x, w)) * F.linear(x, w2), rtol=0, atol=0)
