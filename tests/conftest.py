"""Test configuration: Triton kernels run in the interpreter on machines without a GPU.

Set before anything imports triton, so the real kernel code runs on CPU tensors.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` from the repository root puts the root on sys.path, where our `kernels/` folder shadows the
# optional `kernels` package that transformers probes for on import: import transformers once here, without
# that entry (test modules then get it from sys.modules).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_saved = sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]
try:
    import transformers.activations  # noqa: F401
except ImportError:  # transformers is a test dependency; its absence shows up in the tests that need it
    pass
finally:
    sys.path[:] = _saved
