"""Triton kernels for RAT+ (installed as ``ratplus_kernels``).

Each kernel has a pure-PyTorch reference in the project's ``ops`` package that its tests compare
against (flash-linear-attention's naive/fast layout).
"""
