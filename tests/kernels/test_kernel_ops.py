"""kernel_ops picks the Triton set or the references, under the same names."""
import kernels
from kernels import REFERENCE_OPS, kernel_ops


def test_kernel_ops_offers_the_same_ops_in_both_sets():
    triton_ops = kernel_ops(True)
    assert kernel_ops(False) is REFERENCE_OPS
    assert vars(triton_ops).keys() == vars(REFERENCE_OPS).keys()
    for name, op in vars(triton_ops).items():
        assert op is getattr(kernels, name) and getattr(REFERENCE_OPS, name) is getattr(kernels, name + "_ref")
