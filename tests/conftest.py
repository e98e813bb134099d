"""Test configuration: Triton kernels run in the interpreter on machines without a GPU.

Set before anything imports triton, so the real kernel code runs on CPU tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

