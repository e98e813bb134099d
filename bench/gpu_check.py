"""Correctness of the compiled Triton kernels on a GPU against the PyTorch reference.

``python -m fastattn.bench.gpu_check``: every kernel variant (quant mode x reordering x text
prefix/suffix x head_dim x dtype) at moderate ragged sizes, then rectangular calls (``run_attention``:
a query chunk against a key chunk, Sq != Skv, each with its own text segment) and the log-sum-exp merge
of two key chunks; prints one line per case and exits non-zero on any mismatch. The same matrix runs in
CI under the Triton interpreter at small sizes.
"""

from __future__ import annotations

import itertools
import sys

import torch
from fastattn.attn_kernels import attention_reference, run_attention, sparse_attention
from fastattn.masks import BlockMask, TokenLayout, head_permutations, patterns

TOL = {"none": 1e-2, "int8": 3e-2, "int8-fp8": 5e-2, "int4": 2e-1, "int4-fp8": 2e-1}
# (query layout, key layout) of rectangular calls: Sq < Skv and Sq > Skv, ragged segments; "aligned" has
# a 16-aligned key text segment, so transposed FP8 V goes through its TMA descriptor
RECT = {
    "q<kv prefix": (TokenLayout(1000, 226), TokenLayout(3000, 226)),
    "q>kv suffix": (TokenLayout(4000, 77, text_first=False), TokenLayout(1500, 77, text_first=False)),
    "q<kv aligned": (TokenLayout(700, 256), TokenLayout(2100, 256)),
}


def rect_mask(q_layout: TokenLayout, kv_layout: TokenLayout, heads: int) -> BlockMask:
    """Random per-head blocks (about half), every query block reading at least one, except head 0's block 1."""
    nq = BlockMask.dense(q_layout, 128).num_blocks
    nk = BlockMask.dense(kv_layout, 128).num_blocks
    bm = torch.rand(heads, nq, nk) < 0.5
    bm[:, torch.arange(nq), torch.arange(nq) % nk] = True
    bm[0, 1] = False
    return BlockMask.from_block_map(bm, q_layout, 128, kv_layout)


def rectangular_cases(dev: str) -> int:
    failures = 0
    for (lname, (q_layout, kv_layout)), d, quant in itertools.product(
        RECT.items(), (64, 128), ("none", "int8-fp8")
    ):
        h = 3
        q = torch.randn(2, h, q_layout.seq_len, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(2, h, kv_layout.seq_len, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        mask = rect_mask(q_layout, kv_layout, h)
        res = run_attention(q, k, v, mask, quant=quant)
        ref, ref_lse = attention_reference(q.float(), k.float(), v.float(), mask)
        rows = torch.isfinite(ref_lse)
        err = float((res.out.float()[rows] - ref[rows]).norm() / ref[rows].norm())
        lse_err = float((res.lse[rows] - ref_lse[rows]).abs().max())
        empty_ok = bool((res.out[~rows] == 0).all()) and bool(torch.isinf(res.lse[~rows]).all())
        ok = res.fallback is None and err <= TOL[quant] and lse_err < 0.1 and empty_ok
        ok = ok and bool(torch.isfinite(res.out).all())
        failures += not ok
        print(
            f"{'ok ' if ok else 'BAD'} {lname:13s} D={d:3d} bfloat16 {quant:9s} Sq={q_layout.seq_len} "
            f"Skv={kv_layout.seq_len} rel_l2={err:.4f} lse_err={lse_err:.4f} fallback={res.fallback}"
        )
    # ring attention's property: two key chunks merged by their log-sum-exp equal the whole key set
    q_layout, kv_layout = RECT["q<kv prefix"]
    q = torch.randn(1, 2, q_layout.seq_len, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, kv_layout.seq_len, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    whole = run_attention(q, k, v, BlockMask.dense(q_layout, 128, kv_layout))
    cut = 1250  # inside the image segment of the keys
    chunks = [
        run_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], BlockMask.dense(q_layout, 128, layout))
        for lo, hi, layout in ((0, cut, TokenLayout(cut, 226)), (cut, 3000, TokenLayout(3000 - cut)))
    ]
    lse = torch.logaddexp(chunks[0].lse, chunks[1].lse)
    out = sum(torch.exp(c.lse - lse)[..., None] * c.out.float() for c in chunks)
    err = float((out - whole.out.float()).norm() / whole.out.float().norm())
    lse_err = float((lse - whole.lse).abs().max())
    ok = err < 1e-2 and lse_err < 1e-2
    failures += not ok
    print(
        f"{'ok ' if ok else 'BAD'} two key chunks merged by LSE = all keys: rel_l2={err:.4f} lse={lse_err:.4f}"
    )
    return failures


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
    failures += rectangular_cases(dev)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
