"""Multi-GPU sequence parallelism (issue 17): db-SP against plain Ulysses, and whole steps on N GPUs against one.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 bench/multigpu.py              # -> bench/results/multigpu-<gpu>-x4.json
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 bench/multigpu.py              # (or $OUT/...; --out FILE|DIR)
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 bench/multigpu.py --part steps --only Wan-14B
    python bench/multigpu.py --tiny                                             # CPU, gloo, spawns 2 processes

Two parts (``--part attention|steps|all``); a later run merges its records into the same JSON file:

**attention** — one self-attention call at Wan2.1-14B 720p shapes (81 frames: 21 x 45 x 80 = 75600 latent
tokens, 40 heads x 128, bf16), each rank holding S/N tokens, under an imbalanced per-head plan: 3-D windows of
per-head block densities spread 5-60% with mean 0.25 (``d_i = 0.05 + 0.55 (i / (H - 1))^1.75``, rounded to 0.05).
Per layer the heads are arranged two ways: ``shuffled`` (a seeded random order per layer, as calibrated plans
scatter them) and ``clustered`` (dense heads adjacent, the worst case of a contiguous split). The same plan
runs under :class:`~fastattn.parallel.SequenceParallel` with ``balance="db-sp"`` (heads assigned by block load,
LPT) and ``"none"`` (plain Ulysses: contiguous heads); reported: ms per call (slowest rank), db-SP's speedup and
the sparse imbalance ratio (max / mean rank load from the plan's block counts) of both head splits. One GPU
computing the whole call alone is timed too. Targets (4 GPUs): db-SP >= 1.35x plain Ulysses, ratio <= 1.05.

**steps** — one transformer forward (= one denoising step) of random-weight real architectures: Wan2.1-1.3B
480p, Wan2.1-14B 720p, HunyuanVideo 720p 129 frames (the first 30% of its blocks, as bench/e2e.py, to fit the
time box; ``--hunyuan-depth 1`` for all). The same plan (the family's ``--preset``, sparse from step 0) on one
GPU (every rank alone, at the same time) and on N GPUs through ``fastattn.enable(model, ..., parallel=
dict(ulysses=N))``. Targets: Wan 4 GPUs >= 3.4x and 2 GPUs >= 1.8x one GPU; HunyuanVideo 4 GPUs >= 3.5x.

Random weights give near-uniform attention: this measures speed, never quality. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script from the repository root (the root is the package `fastattn`, installed editable).
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

TARGETS = {
    "attention_dbsp_vs_ulysses_4gpu": 1.35,
    "attention_imbalance_ratio_max": 1.05,
    "steps_wan_4gpu": 3.4,
    "steps_wan_2gpu": 1.8,
    "steps_hunyuan_4gpu": 3.5,
}


# ----------------------------------------------------------------------------------------------- setup


def _versions() -> dict:
    import diffusers

    out = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    try:
        root = Path(__file__).resolve().parents[1]
        out["fastattn_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["fastattn_commit"] = None
    return out


def _device_info(world: int) -> dict:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return {"device": name, "gpus": world, "kind": f"{name.replace(' ', '_').lower()}-x{world}"}
    return {"device": platform.processor() or "cpu", "gpus": 0, "kind": f"cpu-tiny-x{world}"}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _max_over_ranks(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ------------------------------------------------------------------------------------------- attention


def head_densities(heads: int) -> list[float]:
    """Per-head block densities spread 5-60% with mean ~0.25 (a power curve, rounded to 0.05)."""
    return [round((0.05 + 0.55 * (i / max(heads - 1, 1)) ** 1.75) * 20) / 20 for i in range(heads)]


def imbalanced_plan(heads: int, layers: int, block_size: int, seed: int = 0):
    """The per-head plan: layer ``l`` of ``layers`` takes the densities shuffled (seeded) or, for the last layer,
    clustered (sorted: the dense heads adjacent). Returns the plan and the arrangement name of each layer."""
    from fastattn.plans import AttentionPlan, HeadTable, Window3DConfig

    dens = head_densities(heads)
    palette = sorted(set(dens))
    methods = [Window3DConfig(density=d, clamp_density=True) for d in palette]
    g = torch.Generator().manual_seed(seed)
    rows, names = [], []
    for layer in range(layers):
        if layer == layers - 1:
            order, name = torch.arange(heads), "clustered"
        else:
            order, name = torch.randperm(heads, generator=g), "shuffled"
        rows.append(torch.tensor([palette.index(dens[i]) for i in order.tolist()]))
        names.append(name)
    table = HeadTable(methods, torch.stack(rows)[None])
    return AttentionPlan(methods[0], block_size=block_size, heads=table), names


def bench_attention(args, mesh_world: int, rank: int, device, dtype) -> list[dict]:
    """db-SP vs plain Ulysses (and one GPU alone) on one attention call per layer of the imbalanced plan."""
    import torch.distributed as dist
    from fastattn.attention import AttentionRuntime, ForwardContext
    from fastattn.attention.runtime import MaskCache
    from fastattn.masks import TokenLayout
    from fastattn.parallel import ParallelMesh, SequenceParallel
    from fastattn.parallel import balance as balance_mod

    if args.tiny:
        layout, heads, head_dim, block = TokenLayout.video(3, 8, 10), 8, 16, 16
    else:
        layout, heads, head_dim, block = TokenLayout.video(21, 45, 80), 40, 128, 128
    layers = 4  # 3 shuffled + 1 clustered
    plan, names = imbalanced_plan(heads, layers, block)
    masks = MaskCache()
    warmup, iters = (0, 1) if args.tiny else (1, args.iters)
    s = layout.seq_len
    g = torch.Generator().manual_seed(1 + rank)
    records = []
    for degrees in args.attn_degrees:
        u, r = degrees
        if u * r != mesh_world:
            continue
        # q, k, v of this rank's shard (random per rank; the timing does not depend on the values)
        s_local = s // mesh_world
        shard = [torch.randn(1, s_local, heads, head_dim, generator=g).to(device, dtype) for _ in range(3)]
        for balance in ("db-sp", "none"):
            mesh = ParallelMesh.create(dict(ulysses=u, ring=r, balance=balance, timeout_s=args.timeout_s))
            runtime = AttentionRuntime(plan, num_layers=layers)
            runtime.masks = (
                masks  # the plan's masks are built once (seconds each at 75600 tokens on a CPU core)
            )
            sp = SequenceParallel(mesh, runtime)
            positions = sp.positions(layout)  # db-SP's ring split when ring > 1 and the blocks allow
            per_layer = [0.0] * layers
            with torch.no_grad():
                for it in range(warmup + iters):
                    state = runtime.begin_forward(ForwardContext(layout, 0, 1))
                    for layer in range(layers):
                        dist.barrier()
                        _sync()
                        t0 = time.perf_counter()
                        sp.attend(state, *shard, layer=layer, positions=positions)
                        _sync()
                        if it >= warmup:
                            per_layer[layer] += (time.perf_counter() - t0) * 1e3 / iters
                    runtime.end_forward(state)
            per_layer = [_max_over_ranks(x) for x in per_layer]  # the slowest rank sets the pace
            stats = sp.stats()
            for layer in range(layers):
                # the sparse imbalance ratio (max / mean Ulysses rank load) from the plan's per-head block counts
                loads = runtime.head_loads(layer, layout, s)
                lpt, contiguous = (
                    balance_fn(loads, u).ratio
                    for balance_fn in (balance_mod.assign_heads_lpt, balance_mod.contiguous_heads)
                )
                records.append(
                    dict(
                        part="attention",
                        key=f"attention/{u}x{r}/{balance}/layer{layer}",
                        ulysses=u,
                        ring=r,
                        balance=balance,
                        layer=layer,
                        arrangement=names[layer],
                        ms=per_layer[layer],
                        imbalance_ratio=lpt if balance == "db-sp" else contiguous,
                        head_loads=[round(x, 2) for x in loads.tolist()],
                        head_order_used=None
                        if sp.head_order(layer, layout, heads, s) is None
                        else "db-sp (LPT)",
                        ring_balance=str(sp.ring_balance.get(layout)) if r > 1 else None,
                        parallel_fallbacks=stats["parallel_fallbacks"],
                        density=stats["density"],
                    )
                )
    # one GPU alone, the whole call (every rank at once on its own device; rank 0's time is reported)
    if args.single:
        runtime = AttentionRuntime(plan, num_layers=layers)
        runtime.masks = masks
        full = [torch.randn(1, s, heads, head_dim, generator=g).to(device, dtype) for _ in range(3)]
        per_layer = [0.0] * layers
        with torch.no_grad():
            for it in range(warmup + iters):
                state = runtime.begin_forward(ForwardContext(layout, 0, 1))
                for layer in range(layers):
                    _sync()
                    t0 = time.perf_counter()
                    runtime.attend(state, *full, layer=layer)
                    _sync()
                    if it >= warmup:
                        per_layer[layer] += (time.perf_counter() - t0) * 1e3 / iters
                runtime.end_forward(state)
        del full
        for layer in range(layers):
            records.append(
                dict(
                    part="attention",
                    key=f"attention/1gpu/layer{layer}",
                    ulysses=1,
                    ring=1,
                    balance="one GPU",
                    layer=layer,
                    arrangement=names[layer],
                    ms=per_layer[layer],
                    density=runtime.stats.as_dict()["density"],
                )
            )
    _summarize_attention(records, layout, heads, head_dim, plan, mesh_world)
    return records


def _summarize_attention(records, layout, heads, head_dim, plan, world) -> None:
    """Per degrees and arrangement: db-SP's speedup over plain Ulysses (appended as summary records)."""
    by = {}
    for r in records:
        for arrangement in (r["arrangement"], "all layers"):
            by.setdefault((r["ulysses"], r["ring"], arrangement, r["balance"]), []).append(r["ms"])
    for (u, ring, arrangement, balance), ms in list(by.items()):
        if balance != "db-sp":
            continue
        plain = by.get((u, ring, arrangement, "none"))
        one = by.get((1, 1, arrangement, "one GPU"))
        mine = lambda r, b: (
            r.get("balance") == b and r["ulysses"] == u and arrangement in (r["arrangement"], "all layers")
        )
        dbsp_ratio = [r["imbalance_ratio"] for r in records if mine(r, "db-sp")]
        plain_ratio = [r["imbalance_ratio"] for r in records if mine(r, "none")]
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        records.append(
            dict(
                part="attention",
                key=f"attention/{u}x{ring}/{arrangement}/summary",
                summary=True,
                shape=dict(seq_len=layout.seq_len, grid=list(layout.grid), heads=heads, head_dim=head_dim),
                head_densities_requested=head_densities(heads),
                block_size=plan.block_size,
                world_size=world,
                ulysses=u,
                ring=ring,
                arrangement=arrangement,
                dbsp_ms=mean(ms),
                ulysses_ms=mean(plain),
                one_gpu_ms=mean(one),
                dbsp_speedup_vs_ulysses=mean(plain) / mean(ms) if plain else None,
                dbsp_speedup_vs_one_gpu=mean(one) / mean(ms) if one else None,
                imbalance_ratio_dbsp=mean(dbsp_ratio),
                imbalance_ratio_ulysses=mean(plain_ratio),
            )
        )


# ----------------------------------------------------------------------------------------------- steps


def step_cases(tiny: bool, hunyuan_depth: float):
    """(name, kind, config, depth fraction, inputs spec) of the whole-step part."""
    from fastattn.bench.e2e import HUNYUAN, TINY, WAN_13B, WAN_14B

    if tiny:
        return [
            ("Wan2.1-T2V-1.3B", "wan", TINY["wan"], 1.0, dict(kind="wan", frames=5, h=64, w=96, text=12)),
            (
                "HunyuanVideo",
                "hunyuan",
                TINY["hunyuan"],
                1.0,
                dict(kind="hunyuan", frames=5, h=64, w=96, text=10),
            ),
        ]
    return [
        ("Wan2.1-T2V-1.3B", "wan", WAN_13B, 1.0, dict(kind="wan", frames=81, h=480, w=832, text=512)),
        ("Wan2.1-T2V-14B", "wan", WAN_14B, 1.0, dict(kind="wan", frames=81, h=720, w=1280, text=512)),
        (
            "HunyuanVideo",
            "hunyuan",
            HUNYUAN,
            hunyuan_depth,
            dict(kind="hunyuan", frames=129, h=720, w=1280, text=256),
        ),
    ]


def bench_steps(args, world: int, rank: int, device, dtype) -> list[dict]:
    """One transformer forward on one GPU and on ``world`` GPUs, the same plan; speedup = one / N."""
    import gc

    import fastattn.api as fa
    import torch.distributed as dist
    from fastattn.bench.e2e import _scaled, build, inputs_for, time_forward
    from fastattn.pipelines.parallel import gather_stats

    warmup, iters = (0, 1) if args.tiny else (1, args.iters)
    knobs = dict(dense_steps=0, **({"block_size": 16} if args.tiny else {}))
    records = []
    t_start = time.perf_counter()
    for name, kind, cfg, depth, spec in step_cases(args.tiny, args.hunyuan_depth):
        resolution = f"{spec['w']}x{spec['h']}"
        key = f"steps/{name}/{resolution}/{args.preset}"
        if args.only and not re.search(args.only, f"{name} {resolution}"):
            continue
        if _max_over_ranks(time.perf_counter() - t_start) > args.budget_s:
            records.append(dict(part="steps", key=key, model=name, skipped="time budget (--budget-s)"))
            continue
        run_cfg = _scaled(cfg, depth)
        torch.manual_seed(0)  # the same random weights on every rank
        model = build(kind, run_cfg, device, dtype)
        inputs = inputs_for(spec, model, device, dtype)
        # one GPU: every rank runs the whole step alone (on its own GPU, at the same time)
        handle = fa.enable(model, args.preset, **knobs)
        one_ms = time_forward(model, inputs, warmup, iters)
        with torch.no_grad():
            ref = model(**inputs)[0]
        one_stats = handle.stats()
        handle.disable()
        dist.barrier()
        # N GPUs: the same plan, the sequence split over the ranks
        parallel = dict(
            ulysses=args.ulysses or world, ring=world // (args.ulysses or world), balance=args.balance
        )
        handle = fa.enable(model, args.preset, **knobs, parallel=dict(parallel, timeout_s=args.timeout_s))
        par_ms = time_forward(model, inputs, warmup, iters)
        with torch.no_grad():
            out = model(**inputs)[0]
        stats = gather_stats(handle)[0]
        local = handle.stats()
        handle.disable()
        one_ms, par_ms = _max_over_ranks(one_ms), _max_over_ranks(par_ms)
        diff = float((out.float() - ref.float()).abs().max())
        layers = {k: run_cfg[k] for k in ("num_layers", "num_single_layers") if k in run_cfg}
        rec = dict(
            part="steps",
            key=key,
            model=name,
            resolution=resolution,
            frames=spec.get("frames", 1),
            text_tokens=spec["text"],
            preset=args.preset,
            plan=one_stats["plan"],
            world_size=world,
            parallel=parallel,
            one_gpu_ms=one_ms,
            n_gpu_ms=par_ms,
            speedup=one_ms / par_ms,
            density_one_gpu=one_stats["density"],
            density_n_gpu=stats["density"],
            fallbacks=stats["fallbacks"],
            parallel_fallbacks=stats["parallel_fallbacks"],
            head_imbalance=local["parallel"]["head_imbalance"],
            max_abs_diff_vs_one_gpu=diff,
            output_max_abs=float(ref.float().abs().max()),
            layers=layers,
            layers_full={k: cfg[k] for k in layers},
        )
        if depth < 1.0:
            rec["note"] = f"time-boxed: {layers} of {rec['layers_full']} blocks (the speedup is per block)"
        records.append(rec)
        if rank == 0:
            print(
                f"{name:18s} {resolution:>9s} {args.preset}: one GPU {one_ms:9.1f} ms, {world} GPUs {par_ms:9.1f} ms "
                f"x{rec['speedup']:.2f}  (density {stats['density']:.3f}, max diff {diff:.3g})",
                flush=True,
            )
        del model, inputs, ref, out
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


# ------------------------------------------------------------------------------------------------ main


def _degrees(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m:
            raise argparse.ArgumentTypeError(
                f"degrees must look like '4x1,2x2' (ulysses x ring), got {text!r}"
            )
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny CPU configs on gloo (spawns --nproc processes)")
    ap.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    ap.add_argument("--part", choices=("attention", "steps", "all"), default="all")
    ap.add_argument("--only", default=None, help="regex on step model names / resolutions")
    ap.add_argument("--preset", default="balanced", help="the plan of the whole-step part (family preset)")
    ap.add_argument("--ulysses", type=int, default=None, help="Ulysses degree of the steps (default: world)")
    ap.add_argument("--balance", default="db-sp", choices=("db-sp", "none"), help="head balance of the steps")
    ap.add_argument("--attn-degrees", type=_degrees, default=None, help="attention part: e.g. '4x1,2x2'")
    ap.add_argument("--no-single", dest="single", action="store_false", help="skip one-GPU attention timing")
    ap.add_argument("--hunyuan-depth", type=float, default=0.3, help="fraction of HunyuanVideo's blocks")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip remaining step cases after this")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="collective timeout")
    ap.add_argument("--out", default=None, help="JSON file or folder (default $OUT or bench/results)")
    return ap.parse_args(argv)


def _run(args) -> dict:
    """One rank's work (under torchrun, or spawned): returns the record (rank 0 writes it)."""
    import torch.distributed as dist
    from fastattn.parallel import init_process_group

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (the lent machines require it)
    init_process_group(dict(timeout_s=args.timeout_s), backend="gloo" if args.tiny else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    tiny = args.tiny
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("bench/multigpu.py needs CUDA GPUs (or --tiny for the CPU check)")
    if tiny:
        torch.set_num_threads(1)
    device = torch.device("cpu") if tiny else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if tiny else torch.bfloat16
    if args.attn_degrees is None:
        args.attn_degrees = [(world, 1)]
    t0 = time.perf_counter()
    record = dict(bench="multigpu", **_device_info(world), world_size=world, versions=_versions())
    record["env"] = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NCCL_ALGO", "NCCL_PROTO")}
    record["targets"] = TARGETS
    record["records"] = []
    if args.part in ("attention", "all"):
        record["records"] += bench_attention(args, world, rank, device, dtype)
    if args.part in ("steps", "all"):
        record["records"] += bench_steps(args, world, rank, device, dtype)
    record["seconds"] = time.perf_counter() - t0
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if rank == 0:
        _write(record, args)
    dist.barrier()
    dist.destroy_process_group()
    return record


def _write(record: dict, args) -> Path:
    out = Path(args.out or os.environ.get("OUT") or "bench/results")
    if out.suffix != ".json":
        out = out / f"multigpu-{record['kind']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = record
    if out.exists():  # a later part: keep the earlier records it did not re-run
        old = json.loads(out.read_text())
        fresh = {r["key"] for r in record["records"]}
        merged = dict(
            record, records=[r for r in old.get("records", []) if r["key"] not in fresh] + record["records"]
        )
    out.write_text(json.dumps(merged, indent=1))
    print(f"wrote {out} ({len(merged['records'])} records)", flush=True)
    for r in record["records"]:
        if r.get("summary"):
            print(
                f"attention {r['ulysses']}x{r['ring']} {r['arrangement']:9s}: db-SP {r['dbsp_ms']:.2f} ms, Ulysses "
                f"{r['ulysses_ms']:.2f} ms (x{r['dbsp_speedup_vs_ulysses']:.2f}); imbalance {r['imbalance_ratio_dbsp']:.3f}"
                f" vs {r['imbalance_ratio_ulysses']:.3f}",
                flush=True,
            )
    return out


def _spawned(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    _run(parse_args(argv))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # under torchrun
        _run(args)
        return 0
    if not args.tiny:
        raise SystemExit(
            "launch with NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node N bench/multigpu.py (or --tiny on the CPU)"
        )
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(args.nproc, port, argv), nprocs=args.nproc, start_method="spawn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
