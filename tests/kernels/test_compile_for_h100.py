"""Every kernel configuration the wrappers launch compiles to an H100 (sm_90) binary, checked without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).with_name("compile_for_h100.py")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build has no bundled ptxas")
def test_every_launch_configuration_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}      # compile, do not interpret
    root = str(SCRIPT.parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for kernel in ("_shrink_kernel", "_expand_kernel", "_paged_decode_kernel", "_reduce_splits_kernel",
                   "_prefill_kernel", "_paged_prefill_kernel", "_rms_norm_kernel", "_rope_kv_kernel",
                   "_silu_and_mul_kernel", "_scatter_rows_kernel"):
        assert kernel in done.stdout
