"""The Triton kernels, run on CPU by Triton's interpreter, against torch references (GPU runs:
benchmarks/cross_entropy.py and benchmarks/attention_kernels.py check them at full size)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("check", ["cross_entropy", "fp8_cross_entropy", "kl_divergence", "kl_divergence_op", "decode", "decode_new_token",
                                   "decode_model", "decode_gemm"])
def test_kernel_matches_reference_in_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.interpreted", check], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
