"""Kernels: plain-PyTorch references (the CPU path and the test oracle) and Triton versions."""
