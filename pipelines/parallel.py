"""Sequence parallelism for diffusers: ``fastattn.enable(pipe, ..., parallel=dict(ulysses=N))`` under torchrun.

Every rank runs the whole pipeline on the same inputs (the same prompt and seed); only the transformer's
token sequence is split. Per transformer:

1. **Split and gather** (inner hooks): diffusers' own context-parallel hooks
   (``ContextParallelSplitHook`` / ``ContextParallelGatherHook``) on the model's ``_cp_plan`` (Wan, Flux,
   Flux2, Qwen-Image; LTX-Video without its text entries, because its cross-attention runs locally here and
   needs every text token), and our plan in the same format for HunyuanVideo (which has none). Each stream
   (text, image) is cut into ``world`` equal chunks, rank ``r`` keeps chunk ``r``; RoPE tables and per-token
   inputs are cut the same way; the output is all-gathered at ``proj_out``, so every rank ends with the whole
   output and the pipeline's result is the same on every rank.
2. **Context** (outer hook, :class:`ParallelContextHook`): sees the whole input, so the layout is the whole
   sequence's; it checks that every stream splits equally and that every rank got the same input, then makes
   the rank's :class:`ParallelRoute` the active attention for the forward.
3. **Attention**: the processors dispatch to the ``fastattn_sparse`` backend as without parallelism; the
   route hands the local q, k, v and the global positions of the rank's tokens to
   :meth:`fastattn.parallel.SequenceParallel.attend` (Ulysses all-to-all over heads, db-SP head order, ring).
   After diffusers' split a rank's joint sequence is ``[its text chunk, its image chunk]`` for Flux and
   Qwen-Image and ``[its image chunk, its text chunk]`` for HunyuanVideo; the route computes those positions
   from the layout. A key-padding mask of the local tokens (Qwen-Image builds one per rank) is all-gathered
   into the global order.

``disable()`` removes the context hook, then the split/gather hooks: the model is exactly as before.

Errors, before anything is patched: no process group (launch under torchrun and call
:func:`fastattn.parallel.init_process_group` first), ``ulysses x ring != world size``, heads not divisible by
``ulysses``, a family without a split plan (SD3, CogVideoX), block caching (its skip decisions are rank-local
and would desynchronise the ranks), a transformer already under diffusers' own ``enable_parallelism``, a model
on another device type than the process group's. At run time: a stream that does not split into equal chunks
(e.g. a prompt length not divisible by the world size) and ranks with different inputs raise on every rank.

Ring degrees > 1 need whole kernel blocks per rank; diffusers' equal split is block-aligned only when each
stream's chunk is a multiple of the plan's ``block_size``; otherwise the core's documented fallback runs
(keys and values all-gathered), counted in ``stats()["parallel_fallbacks"]``. Ulysses alone has no such limit.

Only rank 0 should write files (the output is the same on every rank)::

    # torchrun --nproc-per-node 4 generate.py
    import torch, fastattn
    from fastattn.parallel import init_process_group
    init_process_group()                       # NCCL; this process's GPU = LOCAL_RANK
    pipe = WanPipeline.from_pretrained(...).to("cuda")
    fastattn.enable(pipe, "balanced", parallel=dict(ulysses=4))
    video = pipe(prompt, generator=torch.Generator("cuda").manual_seed(0)).frames[0]
    if torch.distributed.get_rank() == 0:
        export_to_video(video, "out.mp4")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel import ParallelConfig
from .backend import ACTIVE
from .hooks import ContextHook, install_hook

SPLIT_HOOK = "fastattn_cp_split---{}"
GATHER_HOOK = "fastattn_cp_gather---{}"
# LTX's cross-attention runs locally here and needs every text token: its text stays whole
_LTX_LOCAL = ("encoder_hidden_states", "encoder_attention_mask")


def _hunyuan_plan() -> dict:
    """HunyuanVideo has no ``_cp_plan``: split after the text refiner and the mask (built whole, in global
    ``[image, text]`` order, so the route passes it on as is), at the first double block; RoPE by its output."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        },
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def split_plan(model, family: str) -> dict | None:
    """The context-parallel plan fastattn applies to ``model`` (diffusers' format), or None when it has none."""
    if family == "hunyuan_video":
        return _hunyuan_plan()
    plan = getattr(type(model), "_cp_plan", None)
    if not plan or family not in ("wan", "flux", "flux2", "qwen_image", "ltx_video"):
        return None
    if family == "ltx_video":
        plan = dict(plan)
        plan[""] = {k: v for k, v in plan[""].items() if k not in _LTX_LOCAL}
    return plan


def _model_problem(model, family: str) -> str | None:
    """Why ``model`` cannot run under ``parallel=`` (None: it can)."""
    name = type(model).__name__
    if split_plan(model, family) is None:
        return (
            f"{name} has no sequence split plan; parallel= supports Wan, Flux, Flux2, Qwen-Image, LTX-Video and "
            "HunyuanVideo transformers"
        )
    if getattr(model, "_parallel_config", None) is not None or any(
        n.startswith("cp_") for n in getattr(getattr(model, "_diffusers_hook", None), "hooks", {})
    ):
        return (
            f"{name} is already split by diffusers' own context parallelism (enable_parallelism / "
            "from_pretrained(parallel_config=...)); load it without, fastattn's parallel= splits it itself"
        )
    if family == "hunyuan_video" and getattr(model.config, "image_condition_type", None) == "token_replace":
        return f"{name} with image_condition_type='token_replace' (first-frame tokens) is not supported under parallel="
    return None


_MESHES: dict = {}  # (ulysses, ring, balance, timeout, the world group itself) -> ParallelMesh


class ParallelSession:
    """What ``enable(..., parallel=...)`` checked and built once for every transformer of the call: the mesh.

    :meth:`create` raises (nothing patched yet) when the settings, the process group or a model do not fit.
    """

    def __init__(self, config: ParallelConfig, mesh):
        self.config = config
        self.mesh = mesh

    @classmethod
    def create(cls, parallel, models, plans, adapters) -> ParallelSession:
        """Validate ``parallel`` (dict / :class:`~fastattn.parallel.ParallelConfig`) for ``models`` and build the
        mesh. Collective: every rank must call it (``enable`` does)."""
        import torch.distributed as dist

        from ..parallel import ParallelMesh
        from .integration import _device_type, model_num_heads

        config = ParallelConfig.from_any(parallel)
        for model, plan, adapter in zip(models, plans, adapters):
            problem = _model_problem(model, adapter.family)
            if problem is None and plan.cache.blocks != "off":
                problem = (
                    f"block caching (cache blocks={plan.cache.blocks!r}) is not supported under parallel=: each rank "
                    "would decide its skips on its own tokens and the ranks would fall out of step; use attention "
                    "sharing (attn_share_interval, cfg_share) or no cache"
                )
            if problem is not None:
                raise ValueError(f"fastattn: parallel=: {problem}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "fastattn: parallel= needs a started torch.distributed process group: launch with "
                "`torchrun --nproc-per-node N script.py` and call fastattn.parallel.init_process_group() (or "
                "torch.distributed.init_process_group) before moving the pipeline to the GPU and enabling"
            )
        heads = sorted({model_num_heads(m) for m in models} - {None}) or [None]
        for h in heads:  # every transformer's heads must divide by the Ulysses degree
            u, r = config.degrees(dist.get_world_size(), h)
        # One mesh per settings for the process's life: enabling again (another plan) reuses its process groups
        # instead of making new ones (NCCL communicators hold GPU memory). Every rank enables alike, so every rank
        # hits or misses the cache alike.
        key = (u, r, config.balance, config.timeout_s, dist.group.WORLD)
        mesh = _MESHES.get(key)
        if mesh is None:
            mesh = _MESHES[key] = ParallelMesh.create(config, heads=heads[0])
        for model in models:
            dev = _device_type(model)
            if dev is not None and dev != mesh.device.type:
                raise ValueError(
                    f"fastattn: parallel=: {type(model).__name__} is on {dev} but the process group communicates "
                    f"on {mesh.device.type} ({dist.get_backend()}); move the pipeline to "
                    f"{'the GPU' if mesh.device.type == 'cuda' else 'the CPU'} first"
                )
            if dev == "cuda":
                index = next(model.parameters()).device.index
                if index is not None and index != mesh.device.index:
                    raise ValueError(
                        f"fastattn: parallel=: rank {mesh.rank}'s {type(model).__name__} is on cuda:{index}, but "
                        f"this process's GPU is cuda:{mesh.device.index}; call fastattn.parallel."
                        "init_process_group() (it selects GPU LOCAL_RANK) before moving the pipeline to 'cuda'"
                    )
        return cls(mesh.config, mesh)

    def attach(self, model, adapter, runtime) -> ParallelBinding:
        """Install the split/gather hooks on ``model`` (before its context hook, so they run inside it)."""
        return ParallelBinding(self.mesh, model, adapter, runtime)


# ------------------------------------------------------------------------------------------- one model


@dataclass(frozen=True)
class _GroupMesh:
    """What diffusers' sharders read of a device mesh (``size()``, ``get_group()``): our mesh's all-rank group, in
    which group rank == the rank's place in the Ulysses x ring grid."""

    group: object
    world: int

    def size(self) -> int:
        return self.world

    def get_group(self):
        return self.group


@dataclass
class _SplitConfig:
    """The fields of diffusers' ``ContextParallelConfig`` its split/gather hooks read (equal chunks only)."""

    _flattened_mesh: _GroupMesh
    ulysses_anything: bool = False
    ring_anything: bool = False


class ParallelBinding:
    """One transformer under sequence parallelism: its split/gather hooks, :class:`SequenceParallel`, and route."""

    def __init__(self, mesh, model, adapter, runtime):
        from diffusers.hooks.context_parallel import (
            ContextParallelGatherHook,
            ContextParallelSplitHook,
            _get_submodule_by_name,
        )
        from diffusers.models._modeling_parallel import ContextParallelOutput

        from ..parallel import SequenceParallel

        self.mesh = mesh
        self.sp = SequenceParallel(mesh, runtime)
        self.route = ParallelRoute(self.sp)
        cfg = _SplitConfig(_GroupMesh(mesh.world_group, mesh.world_size))
        self._removers = []
        try:
            for name, entry in split_plan(model, adapter.family).items():
                modules = _get_submodule_by_name(model, name)
                for module in modules if isinstance(modules, list) else [modules]:
                    if isinstance(entry, dict):
                        hook, hook_name = ContextParallelSplitHook(entry, cfg), SPLIT_HOOK.format(name)
                    else:
                        outs = [entry] if isinstance(entry, ContextParallelOutput) else list(entry)
                        hook, hook_name = ContextParallelGatherHook(outs, cfg), GATHER_HOOK.format(name)
                    self._removers.append(install_hook(module, hook, hook_name))
        except Exception:
            self.remove()
            raise

    def context_hook(self, adapter, runtime, clock, watch=None) -> ParallelContextHook:
        return ParallelContextHook(adapter, runtime, clock, watch=watch, route=self.route)

    def remove(self) -> None:
        """Remove the split/gather hooks (after the context hook: the registries they made then go too)."""
        for remove in reversed(self._removers):
            remove()
        self._removers = []

    def stats(self) -> dict:
        """This rank's view (no communication): the mesh, the db-SP head balance per layer, the ring split.
        :func:`gather_stats` sums the runtime counters of every rank (collective)."""
        sp = self.sp
        return dict(
            self.mesh.describe(),
            split="diffusers' equal split per stream (text, image)",
            head_imbalance={layer: round(a, 4) for layer, (a, _) in sp.imbalance.items()},
            head_imbalance_contiguous={layer: round(b, 4) for layer, (_, b) in sp.imbalance.items()},
        )


class ParallelRoute:
    """What the backend calls during a forward under parallelism (in place of the runtime): this rank's token
    shard of every self-attention call goes to :meth:`SequenceParallel.attend` with its global positions."""

    def __init__(self, sp):
        self.sp = sp
        self._positions: dict = {}  # layout -> (this rank's positions or None, every rank's, flattened)

    @property
    def stats(self):
        return self.sp.runtime.stats

    def positions(self, layout) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(mine, every)``: the global positions of this rank's tokens after diffusers' split (None: the
        contiguous chunk ``rank``) and those of every rank, rank by rank (``[S]``)."""
        hit = self._positions.get(layout)
        if hit is None:
            world, rank = self.sp.mesh.world_size, self.sp.mesh.rank
            every = [shard_positions(layout, r, world) for r in range(world)]
            mine = None if layout.text_len == 0 else every[rank]
            hit = self._positions[layout] = (mine, torch.cat(every))
        return hit

    def attend(self, state, query, key, value, attn_mask=None, scale=None):
        runtime = self.sp.runtime
        if key.shape[1] != query.shape[1]:  # a cross-attention call on a shared processor: local, dense
            return runtime.attend(state, query, key, value, attn_mask, scale)
        layout = state.ctx.layout if state is not None else None
        world = self.sp.mesh.world_size
        s_local = query.shape[1]
        if layout is None or layout.seq_len != s_local * world:
            raise ValueError(
                f"fastattn: parallel=: a self-attention call holds {s_local} tokens per rank x {world} ranks, but "
                f"the forward's layout has {None if layout is None else layout.seq_len}: this model's attention "
                "does not follow the split"
            )
        mine, every = self.positions(layout)
        if (
            attn_mask is not None
            and attn_mask.dim() >= 1
            and attn_mask.shape[-1] == s_local != layout.seq_len
        ):
            attn_mask = self._global_key_mask(attn_mask, every)
        return self.sp.attend(state, query, key, value, attn_mask, scale, positions=mine)

    def _global_key_mask(self, mask: torch.Tensor, every: torch.Tensor) -> torch.Tensor:
        """A key mask over this rank's tokens -> over the whole sequence in global order (all ranks' masks)."""
        from ..parallel.comm import all_gather

        if mask.dim() >= 2 and mask.shape[-2] != 1:
            raise ValueError(
                f"fastattn: parallel=: an attention mask over this rank's keys with a query dim "
                f"({tuple(mask.shape)}) cannot be assembled across ranks; only key-padding masks [..., 1, S] are"
            )
        mesh = self.sp.mesh
        parts = all_gather(
            mask.to(mesh.device),
            mesh.world_group,
            mesh.world_size,
            "assembling the key mask",
            mesh.config.timeout_s,
        )
        gathered = torch.cat(parts, dim=-1)  # rank by rank: index i holds global position every[i]
        return gathered.index_select(-1, torch.argsort(every).to(gathered.device)).to(mask.device)


def shard_positions(layout, rank: int, world: int) -> torch.Tensor:
    """Global positions rank ``rank`` holds after diffusers' split: each stream (text, image) cut into ``world``
    equal chunks, the rank's chunks in the streams' global order (``[text, image]`` when text comes first)."""
    t, n_img = layout.text_len, layout.seq_len - layout.text_len
    segments = [(0, t), (t, n_img)] if layout.text_first else [(0, n_img), (n_img, t)]
    parts = []
    for start, length in segments:
        if length % world:
            raise ValueError(f"{length} tokens do not split into {world} equal chunks")
        n = length // world
        parts.append(start + rank * n + torch.arange(n))
    return torch.cat(parts)


class ParallelContextHook(ContextHook):
    """The context hook of a split model: the forward's layout from the whole input, two checks every rank makes
    alike (equal split, equal input), and the rank's route as the active attention."""

    def __init__(self, adapter, runtime, clock, watch=None, route: ParallelRoute | None = None):
        super().__init__(adapter, runtime, clock, watch=watch)
        self.route = route

    @torch.compiler.disable
    def _begin(self, module, args, kwargs):
        state, token = super()._begin(module, args, kwargs)
        try:
            self._check(state.ctx.layout, args, kwargs)
        except BaseException:
            self._end(state, token)
            raise
        ACTIVE.reset(token)
        return state, ACTIVE.set((self.route, state))

    def _check(self, layout, args, kwargs) -> None:
        from ..parallel.comm import all_gather

        mesh = self.route.sp.mesh
        if layout is None:
            raise ValueError(
                f"fastattn: parallel=: the token layout of this {self.adapter.family} forward is unknown, so the "
                "ranks' token positions cannot be told"
            )
        try:
            shard_positions(layout, 0, mesh.world_size)
        except ValueError as e:
            raise ValueError(
                f"fastattn: parallel=: the sequence ({layout.text_len} text + {layout.seq_len - layout.text_len} "
                f"image tokens) does not split equally over {mesh.world_size} ranks: {e}; pad the prompt "
                f"(max_sequence_length) or pick a resolution / frame count whose token counts divide by "
                f"{mesh.world_size}"
            ) from None
        # Ranks that got different inputs (another seed) would silently mix two generations.
        tensors = [
            x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.is_floating_point()
        ]
        sums = [torch.stack([x.double().sum(), x.double().abs().sum()]).cpu() for x in tensors]
        mine = torch.cat(sums) if sums else torch.zeros(1, dtype=torch.float64)
        every = torch.stack(
            all_gather(
                mine.to(mesh.device),
                mesh.world_group,
                mesh.world_size,
                "checking inputs",
                mesh.config.timeout_s,
            )
        ).cpu()
        if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-5, atol=1e-6):
            raise ValueError(
                "fastattn: parallel=: the ranks passed different inputs to the transformer; every rank must run the "
                "pipeline with the same prompt and seed (e.g. generator=torch.Generator(device).manual_seed(0))"
            )


def gather_stats(handle) -> list[dict]:
    """Every transformer's runtime stats summed over the ranks (:meth:`SequenceParallel.stats`). Collective:
    call it on every rank."""
    return [m.parallel.sp.stats() for m in handle.models if getattr(m, "parallel", None) is not None]
