"""Kernel tests run the Triton kernels compiled on a GPU, or under Triton's interpreter on CPU.

TRITON_INTERPRET is read when a kernel is decorated, so it is set before `kernels` is imported; if a test
collected earlier already imported it without the interpreter, its modules are reloaded.
"""
import importlib
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for name in sorted((m for m in sys.modules if m == "kernels" or m.startswith("kernels.")), reverse=True):
        importlib.reload(sys.modules[name])                  # submodules before the package


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the bigger kernel cases (a few seconds each under the interpreter)")
