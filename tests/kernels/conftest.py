"""Kernel tests run the Triton kernels compiled on a GPU, or under Triton's interpreter on CPU.

TRITON_INTERPRET is read when triton and the kernels are imported, so it must be set before anything
imports triton (peft and transformers do): here for `pytest tests/kernels`, and in tests/conftest.py for
the whole suite.
"""
import os
import sys

import pytest
import torch

INTERPRETER_MISSING = (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
                       and "triton" in sys.modules)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def triton_interpreter_on_cpu():
    if INTERPRETER_MISSING:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py "
                    "when CUDA is absent, before anything imports triton, peft or transformers")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the bigger kernel cases (seconds each under the interpreter)")
