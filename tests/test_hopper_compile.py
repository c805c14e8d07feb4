"""Every Triton kernel of `mmsae.kernels` compiles for Hopper (sm_90) on this GPU-less machine:
`tests/hopper_compile.py` runs the product's launches with each launch compiled instead of run. The
interpreter the other CPU tests use never meets the compiler's rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("hopper_compile.py")


def test_every_kernel_compiles_for_hopper() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-P", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    compiled = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("compiled ")}
    assert len(compiled) >= 20 and "_linear_group_max_kernel" in compiled and "_adam_kernel" in compiled
    assert "never launched: none" in out.stdout and out.stdout.rstrip().endswith("0 failed")
