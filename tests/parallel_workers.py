"""Multi-process harness of the fastattn.parallel tests: gloo process groups on localhost, one process per rank.

:func:`launch` starts ``world`` spawned processes that join a gloo group on a free port and run one worker
function; it returns each rank's result (or the error it raised, as text) and fails if a rank hangs past the
deadline. The workers below build the same plan and the same full q, k, v on every rank (seeded), run the
one-process runtime on the whole sequence as the reference, and SequenceParallel on their shard.

Imported by name from tests/ (the test modules put this folder on sys.path: spawned children import it).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, out_dir, args):
    torch.set_num_threads(1)  # the CI box has 2 cores for all ranks
    result = {"rank": rank}
    start = time.monotonic()
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),  # joining may be slow on a busy box; meshes set their own
        )
        result["value"] = fn(rank, world, *args)
    except BaseException as e:  # noqa: BLE001 - reported to the test, which asserts on it
        result["error"] = f"{type(e).__name__}: {e}"
        result["error_type"] = type(e).__name__
        result["traceback"] = traceback.format_exc()
    result["elapsed"] = time.monotonic() - start
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    if dist.is_initialized() and "error" not in result:
        dist.destroy_process_group()


def launch(fn, world: int, *args, deadline_s: float = 300.0) -> list[dict]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; ``[{"value" | "error", "elapsed"}...]`` by rank.

    A rank still running after ``deadline_s`` is killed and the launch fails (a hang is a test failure)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, args)) for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise AssertionError(f"ranks {hung} still running after {deadline_s}s (a hang)")
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"{r}.pt")
            results.append(
                torch.load(path, weights_only=False)
                if os.path.exists(path)
                else {"rank": r, "exit": p.exitcode}
            )
        return results


def values(results: list[dict]) -> list:
    """Each rank's value; an AssertionError with the first rank's traceback if any rank raised."""
    for r in results:
        if "value" not in r:
            raise AssertionError(f"rank {r['rank']} failed: {r.get('traceback') or r}")
    return [r["value"] for r in results]


# ----------------------------------------------------------------------------------------------- cases
BS = 16


def layouts():
    from fastattn.masks import TokenLayout

    return {
        # 16 text + 240 latent tokens: contiguous shards of 2 or 4 ranks are whole 16-token blocks
        "video": TokenLayout.video(3, 8, 10, text_len=16),
        # ragged: a 10-token text block and a 6-token latent tail
        "ragged": TokenLayout.video(2, 3, 41, text_len=10),
        # text last (HunyuanVideo / SD3 order)
        "text_last": TokenLayout.video(3, 8, 10, text_len=16, text_first=False),
    }


def positions_for(kind: str, layout, rank: int, world: int) -> torch.Tensor | None:
    """The global positions rank ``rank`` holds.

    ``contiguous``: None (the default split). ``flux``: a text shard then a latent shard (diffusers' split of
    Flux's text and image streams). ``ragged_whole``: whole blocks of the ragged layout, not contiguous (world 2).
    ``interleaved``: every other token (never whole blocks).
    """
    s, t = layout.seq_len, layout.text_len
    if kind == "contiguous":
        return None
    if kind == "flux":
        img = s - t
        text = torch.arange(rank * t // world, (rank + 1) * t // world)
        image = t + torch.arange(rank * img // world, (rank + 1) * img // world)
        return torch.cat([text, image])
    if kind == "ragged_whole":
        assert world == 2 and (t, s) == (10, 256)
        if rank == 0:  # the text block, 7 latent blocks and the latent tail
            return torch.cat([torch.arange(10), 10 + torch.arange(112), 10 + torch.arange(240, 246)])
        return 10 + torch.arange(112, 240)
    if kind == "interleaved":
        return torch.arange(rank, s, world)
    raise ValueError(kind)


def make_plan(name: str, layers: int, heads: int):
    from fastattn.plans import (
        AttentionPlan,
        BandConfig,
        DenseConfig,
        DynamicConfig,
        HeadTable,
        RadialConfig,
        SkipConfig,
        Window3DConfig,
    )

    if name == "dense":
        return AttentionPlan(DenseConfig(), block_size=BS)
    if name == "window3d":
        return AttentionPlan(Window3DConfig(window=(1, 2, 2)), block_size=BS, dense_layers=(0,))
    if name == "radial":
        return AttentionPlan(RadialConfig(window=(2, 3)), block_size=BS)
    if name == "shared":  # attention outputs reused across steps (AST)
        cache = dict(attn_share_interval=2, first_steps=1, last_steps=1)
        return AttentionPlan(Window3DConfig(window=(1, 2, 2)), block_size=BS, cache=cache)
    if name == "int8":
        return AttentionPlan(Window3DConfig(window=(1, 3, 3)), quant="int8", block_size=BS)
    if name == "dynamic":
        return AttentionPlan(DynamicConfig(top_p=0.8), block_size=BS)
    if name == "per_head_plain":  # per-head methods, no reordering or quantization: the ring runs natively
        methods = (
            DenseConfig(),
            BandConfig(window=40),
            Window3DConfig(window=(0, 1, 1)),
            BandConfig(window=4),
        )
        g = torch.Generator().manual_seed(5)
        table = HeadTable(methods, torch.randint(0, len(methods), (1, layers, heads), generator=g))
        return AttentionPlan(Window3DConfig(window=(1, 1, 1)), block_size=BS, heads=table)
    if name == "per_head":
        # very unequal heads: dense, wide band, skipped, windows in reordered (PARO) axis orders, int8 heads
        methods = (DenseConfig(), BandConfig(window=40), SkipConfig(), Window3DConfig(window=(0, 1, 1)))
        g = torch.Generator().manual_seed(5)
        method_index = torch.randint(0, len(methods), (1, layers, heads), generator=g)
        method_index[0, 0, :4] = 0  # layer 0: dense heads first, skipped ones next (contiguous is bad)
        method_index[0, 0, 4:6] = 2
        order_index = torch.randint(0, 6, (1, layers, heads), generator=g)
        quant_index = torch.where(torch.rand(1, layers, heads, generator=g) < 0.3, 1, -1)
        table = HeadTable(methods, method_index, order_index=order_index, quant_index=quant_index)
        return AttentionPlan(Window3DConfig(window=(1, 1, 1)), block_size=BS, heads=table)
    if name == "reuse":
        # head-wise reuse and residual sharing: caches kept per (layer, CFG pass) across steps
        methods = (BandConfig(window=24), Window3DConfig(window=(1, 2, 2)), DenseConfig())
        g = torch.Generator().manual_seed(7)
        method_index = torch.randint(0, len(methods), (2, layers, heads), generator=g)
        reuse = torch.zeros(2, layers, heads, dtype=torch.bool)
        reuse[1, :, ::3] = True
        table = HeadTable(methods, method_index, step_bounds=(0.0, 0.5, 1.0), reuse=reuse)
        return AttentionPlan(BandConfig(window=24), block_size=BS, heads=table, residual=True, dense_steps=1)
    raise ValueError(name)


def exactness(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """Run each case under SequenceParallel and the one-process runtime; per case the worst error and stats.

    A case: ``plan`` (see :func:`make_plan`), ``ulysses``, ``ring``, ``balance``, ``layout``, ``positions``
    (see :func:`positions_for`), and optionally ``dtype``, ``heads``, ``head_dim``, ``steps``, ``layers``,
    ``mask`` ("padding": a key-padding mask dropping text keys), ``backend``.
    """
    from fastattn.attention import AttentionRuntime, ForwardContext
    from fastattn.parallel import ParallelMesh, SequenceParallel

    meshes = {}
    out = []
    for case in cases:
        layout = layouts()[case.get("layout", "video")]
        heads, d = case.get("heads", 8), case.get("head_dim", 16)
        layers, steps = case.get("layers", 2), case.get("steps", 1)
        dtype = getattr(torch, case.get("dtype", "float32"))
        degrees = (case["ulysses"], case["ring"], case.get("balance", "db-sp"))
        if degrees not in meshes:
            cfg = dict(ulysses=degrees[0], ring=degrees[1], balance=degrees[2], timeout_s=30)
            meshes[degrees] = ParallelMesh.create(cfg)
        mesh = meshes[degrees]
        plan = make_plan(case["plan"], layers, heads)
        kernel_kwargs = {}
        if case.get("backend"):
            from fastattn.attn_kernels import run_attention

            def kernel(q, k, v, mask, scale=None, quant="none", perm=None, _b=case["backend"]):
                r = run_attention(
                    q, k, v, mask, scale=scale, quant=quant, perm=perm, backend=_b, need_lse=False
                )
                return r.out, r.fallback

            kernel_kwargs["sparse_fn"] = kernel
        ref_rt = AttentionRuntime(plan, num_layers=layers, **kernel_kwargs)
        rt = AttentionRuntime(plan, num_layers=layers, **kernel_kwargs)
        sp = SequenceParallel(mesh, rt, backend=case.get("backend") or "auto")
        if case.get("positions") == "balanced":  # db-SP's ring block assignment
            pos = sp.positions(layout)
            assert pos is not None, sp.ring_balance
        else:
            pos = positions_for(case.get("positions", "contiguous"), layout, rank, world)
        s = layout.seq_len
        rows = pos if pos is not None else torch.arange(rank * s // world, (rank + 1) * s // world)
        mask = None
        if case.get("mask") == "padding":  # key padding: the last three text tokens dropped
            mask = torch.ones(1, 1, 1, s, dtype=torch.bool)
            text_end = layout.text_len if layout.text_first else s
            mask[..., text_end - 3 : text_end] = False
        elif case.get("mask") == "float":  # an additive bias per (query, key): the runtime serves it dense
            mask = torch.randn(1, 1, s, s, generator=torch.Generator().manual_seed(3))
        worst, scale_ref = 0.0, 0.0
        g = torch.Generator().manual_seed(11)
        for step in range(steps):
            ctx = ForwardContext(layout, step, steps)
            st_ref, st = ref_rt.begin_forward(ctx), rt.begin_forward(ctx)
            for _layer in range(layers):
                q, k, v = (torch.randn(1, s, heads, d, generator=g).to(dtype) for _ in range(3))
                with torch.no_grad():
                    ref = ref_rt.attend(st_ref, q, k, v, mask)[:, rows]
                    got = sp.attend(st, q[:, rows], k[:, rows], v[:, rows], mask, positions=pos)
                worst = max(worst, float((got.float() - ref.float()).abs().max()))
                scale_ref = max(scale_ref, float(ref.float().abs().max()))
            ref_rt.end_forward(st_ref)
            rt.end_forward(st)
        stats = sp.stats()
        ref_stats = ref_rt.stats.as_dict()
        out.append(
            dict(
                case=case,
                err=worst,
                ref_max=scale_ref,
                parallel_fallbacks=stats["parallel_fallbacks"],
                fallbacks=stats["fallbacks"],
                planned_dense=stats["planned_dense"],
                density=stats["density"],
                ref_density=ref_stats["density"],
                ref_fallbacks=ref_stats["fallbacks"],
                head_reuses=stats["head_reuses"],
                reused_calls=stats["reused_calls"],
                ref_reused_calls=ref_stats["reused_calls"],
                ref_head_reuses=ref_stats["head_reuses"],
                imbalance=stats["parallel"]["head_imbalance"],
                imbalance_contiguous=stats["parallel"]["head_imbalance_contiguous"],
                ring_balance=stats["parallel"]["ring_balance"],
                degrees=stats["parallel"]["degrees"],
            )
        )
    return out


def failing(rank: int, world: int, mode: str, timeout_s: float) -> dict:
    """Ulysses attention calls in a loop; at call 3 the last rank dies (``"die"``), stalls (``"stall"``) or passes
    a shard of another length (``"mismatch_later"``). Returns how far this rank got; raises what the run raised."""
    from fastattn.attention import AttentionRuntime, ForwardContext
    from fastattn.masks import TokenLayout
    from fastattn.parallel import ParallelMesh, SequenceParallel
    from fastattn.plans import AttentionPlan, Window3DConfig

    layout = TokenLayout.video(2, 4, 6, text_len=0)  # 48 tokens: 16 per rank with 3 ranks
    mesh = ParallelMesh.create(dict(ulysses=world, ring=1, timeout_s=timeout_s))
    rt = AttentionRuntime(AttentionPlan(Window3DConfig(window=(1, 1, 1)), block_size=BS), num_layers=1)
    sp = SequenceParallel(mesh, rt)
    s_local = layout.seq_len // world
    victim = rank == world - 1
    for call in range(6):
        if victim and call == 3:
            if mode == "die":
                os._exit(3)  # as a kill or an out-of-memory abort: no Python cleanup, no message to the peers
            if mode == "stall":
                time.sleep(timeout_s + 2)  # the peers give up after timeout_s
        n = s_local - 1 if victim and call == 3 and mode == "mismatch_later" else s_local
        q = torch.randn(1, n, world * 2, 16)
        state = rt.begin_forward(ForwardContext(layout, call, 6))
        start = time.monotonic()
        try:
            with torch.no_grad():
                sp.attend(state, q, q, q)
        except Exception as e:  # noqa: BLE001 - the test reads it, with how long the failing call waited
            return {
                "call": call,
                "error": str(e),
                "type": type(e).__name__,
                "waited": time.monotonic() - start,
            }
        rt.end_forward(state)
    return {"calls": 6}


def bad_input(rank: int, world: int) -> dict:
    """The errors SequenceParallel and ParallelMesh raise for input they cannot serve (every rank alike)."""
    from fastattn.attention import AttentionRuntime, ForwardContext
    from fastattn.masks import TokenLayout
    from fastattn.parallel import ParallelMesh, SequenceParallel
    from fastattn.plans import AttentionPlan

    errors = {}

    def catch(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test reads the message
            errors[name] = f"{type(e).__name__}: {e}"

    catch("degrees", lambda: ParallelMesh.create(dict(ulysses=2, ring=2)))
    mesh = ParallelMesh.create(dict(ulysses=2, ring=1, timeout_s=10))
    rt = AttentionRuntime(AttentionPlan(block_size=BS), num_layers=1)
    sp = SequenceParallel(mesh, rt)
    state = rt.begin_forward(ForwardContext(TokenLayout.video(1, 4, 8), 0, 1))
    x = torch.randn(1, 16, 3, 8)
    catch("heads", lambda: sp.attend(state, x, x, x))
    y = torch.randn(1, 16, 4, 8, requires_grad=True)
    catch("grad", lambda: sp.attend(state, y, y, y))
    z = torch.randn(1, 16, 4, 8, device="meta")
    catch("device", lambda: sp.attend(state, z, z, z))
    w = torch.randn(1, 16, 4, 8)
    catch("positions", lambda: sp.attend(state, w, w, w, positions=torch.arange(16)))  # both ranks 0..15
    catch("positions_shape", lambda: sp.attend(state, w, w, w, positions=torch.arange(15)))
    v = torch.randn(1, 16 - rank, 4, 8)  # rank 1 holds a shorter shard
    catch("mismatch", lambda: sp.attend(state, v, v, v))
    return errors
