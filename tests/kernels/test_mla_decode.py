"""The decode kernel's launch heuristic (the kernel itself: test_interpreted.py on CPU,
benchmarks/attention_kernels.py against an fp32 reference on the GPU)."""

import pytest
import torch

from latentformer.kernels.mla_decode import NewToken, default_splits, latent_decode_attention

H100 = dict(sms=132, smem_per_sm=228 * 1024)


@pytest.mark.parametrize("B,S,row_bytes,want", [
    (64, 8192, 160 * 2, 5),    # mla-125m (r 128 + dr 32, bf16): 2 programs per SM, 3 fit
    (64, 8192, 288 * 2, 4),    # latentformer-348m (r 256): only 2 fit per SM -> 4 slices, not 5 (no 2nd wave)
    (16, 32768, 160 * 2, 17),  # small batch: more slices per row
    (1, 100, 160 * 2, 1),      # a short cache is one slice (each slice >= 4 tiles)
])
def test_h100_choices(B, S, row_bytes, want):
    assert default_splits(B, S, row_bytes, block_s=64, num_stages=3, **H100) == want


@pytest.mark.parametrize("B", [1, 3, 16, 64, 100, 512])
@pytest.mark.parametrize("row_bytes", [160 * 2, 288 * 2, 576 * 2])
def test_programs_fit_in_one_wave(B, row_bytes):
    splits = default_splits(B, 65536, row_bytes, block_s=64, num_stages=3, **H100)
    per_sm = max(1, H100["smem_per_sm"] // (3 * 64 * row_bytes))
    assert splits >= 1
    assert B * splits <= max(B, H100["sms"] * per_sm)  # a batch larger than the GPU still gets one slice


@pytest.mark.parametrize("arrivals", [torch.zeros(2, dtype=torch.int32), torch.zeros(3, dtype=torch.int64)])
def test_arrival_counter_is_checked(arrivals):
    """The kernel counts finished slices per row in `arrivals`: too few rows or another dtype is an error."""
    pytest.importorskip("triton")
    q_lat, q_pe, latent = torch.zeros(3, 4, 16), torch.zeros(3, 4, 16), torch.zeros(3, 64, 32)
    with pytest.raises(ValueError, match="arrivals"):
        latent_decode_attention(q_lat, q_pe, latent, 16, 0.1, None, arrivals=arrivals)


def test_new_token_angles_are_checked():
    """cos and sin of the new token must both hold dr/2 angles per row."""
    pytest.importorskip("triton")
    q_lat, q_pe, latent = torch.zeros(3, 4, 16), torch.zeros(3, 4, 16), torch.zeros(3, 64, 32)
    new = NewToken(torch.zeros(3, 32), torch.ones(16), 1e-6, torch.zeros(1, 8), torch.zeros(3, 8), False)
    with pytest.raises(ValueError, match="cos and sin"):
        latent_decode_attention(q_lat, q_pe, latent, 16, 0.1, None, new=new)
