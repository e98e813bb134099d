"""Correctness of the compiled Triton kernels on a GPU against the PyTorch reference.

``python -m fastattn.bench.gpu_check``: every kernel variant (quant mode x reordering x text
prefix/suffix x head_dim x dtype) at moderate ragged sizes; prints one line per case and exits
non-zero on any mismatch. The same matrix runs in CI under the Triton interpreter at small sizes.
"""

from __future__ import annotations

import itertools
import sys

import torch
from fastattn.attn_kernels import attention_reference, sparse_attention
from fastattn.masks import TokenLayout, head_permutations, patterns

TOL = {"none": 1e-2, "int8": 3e-2, "int8-fp8": 5e-2, "int4": 2e-1, "int4-fp8": 2e-1}


def main() -> int:
    torch.manual_seed(0)
    dev = "cuda"
    failures = 0
    layouts = {
        "video_ragged": TokenLayout.video(5, 17, 23),
        "text_prefix": TokenLayout.video(3, 16, 21, text_len=226, text_first=True),
        "text_suffix": TokenLayout.video(3, 16, 21, text_len=77, text_first=False),
    }
    for (lname, layout), d, dtype, quant, reorder in itertools.product(
        layouts.items(),
        (64, 128),
        (torch.bfloat16, torch.float16),
        ("none", "int8", "int8-fp8", "int4-fp8"),
        (False, True),
    ):
        h = 3
        q, k, v = (torch.randn(2, h, layout.seq_len, d, device=dev, dtype=dtype) for _ in range(3))
        mask = patterns.window3d(layout, (1, 4, 4), 128)
        perm = head_permutations(layout, ["HWF", "FHW", "WFH"]).to(dev) if reorder else None
        out, lse = sparse_attention(q, k, v, mask, quant=quant, perm=perm, return_lse=True)
        ref, ref_lse = attention_reference(q.float(), k.float(), v.float(), mask, perm=perm)
        err = float((out.float() - ref).norm() / ref.norm())
        lse_err = float((lse - ref_lse).abs().max())
        lse_tol = 0.25 if quant.startswith("int4") else 0.1
        ok = err <= TOL[quant] and lse_err < lse_tol and bool(torch.isfinite(out).all())
        failures += not ok
        print(
            f"{'ok ' if ok else 'BAD'} {lname:13s} D={d:3d} {str(dtype)[6:]:8s} {quant:9s} reorder={int(reorder)} "
            f"rel_l2={err:.4f} lse_err={lse_err:.4f}"
        )
    # empty rows: a head with no key blocks gives zeros and lse = -inf
    layout = TokenLayout.video(2, 16, 16)
    mask = patterns.window3d(layout, (0, 2, 2), 128)
    mask = mask.expand_heads(2)
    mask = type(mask).from_block_map(mask.to_block_map(), layout, 128).skip_heads([1])
    q, k, v = (torch.randn(1, 2, layout.seq_len, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    out, lse = sparse_attention(q, k, v, mask, return_lse=True)
    ok = (
        bool((out[:, 1] == 0).all())
        and bool(torch.isinf(lse[:, 1]).all())
        and bool(torch.isfinite(out).all())
    )
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} skipped head gives zeros and -inf lse")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
