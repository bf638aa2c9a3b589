"""Kernel tests: without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The variable must be set before msabank.kernels.triton_routing defines its kernels, i.e. before the
first Triton call; the facade imports that module lazily, so setting it here is early enough.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
