"""Triton is optional: where it is not installed (CPU-only torch wheels, macOS, Windows, a CPU-only ComfyUI), the
default backend serves CPU calls on the PyTorch path without importing it.

A real CPU ComfyUI host (torch 2.13.0+cpu, no triton) failed every sparse Fast Attention run with
``No module named 'triton'`` before: the backend choice imported the Triton module only to read an environment
variable. The check runs in a subprocess whose import system refuses ``triton``, since this process may have
imported it already.
"""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import os
    import sys


    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "triton":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, NoTriton())
    os.environ.pop("TRITON_INTERPRET", None)

    import torch
    from fastattn.attn_kernels import sparse_attention
    from fastattn.attn_kernels.ops import backend_stats
    from fastattn.masks import patterns
    from fastattn.masks.layout import TokenLayout

    layout = TokenLayout.video(2, 2, 9, text_len=5)
    mask = patterns.band(layout, 8, block_size=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 64, generator=g) for _ in range(3))
    out = sparse_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_token_mask())
    try:  # asking for the Triton kernel where it is missing: a clear error, not ModuleNotFoundError
        sparse_attention(q, k, v, mask, backend="triton")
        triton_error = None
    except ValueError as e:
        triton_error = str(e)
    print(json.dumps({
        "triton_error": triton_error,
        "max_abs_diff": float((out - ref).abs().max()),
        "density": mask.density(),
        "served": backend_stats()["served"],
        "triton_imported": any(m.split(".")[0] == "triton" for m in sys.modules),
    }))
    """
)


def test_cpu_sparse_attention_runs_without_triton():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd="/", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["density"] < 1.0  # a sparse mask: the listed-blocks path, not a dense shortcut
    assert result["served"] == {"cpu": 1}, result  # the listed-blocks PyTorch path
    assert result["max_abs_diff"] < 1e-5, result
    assert not result["triton_imported"], result
    assert "Triton cannot be imported" in (result["triton_error"] or ""), result
