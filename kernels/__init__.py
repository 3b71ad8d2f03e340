"""a1_kernels: Triton kernels for megatron_a1 with their PyTorch references.

Installed under the import name ``a1_kernels`` (see setup.py); one sub-package per op, each with
its kernels, launchers, one autograd Function and a plain-PyTorch ``reference.py``.
"""
