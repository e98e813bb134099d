"""One sequence-parallel diffusion forward, the same on every rank: token shards through the transformer blocks.

Every rank (the ComfyUI process and each worker) runs the model's ``forward`` on the same inputs. The cheap parts
outside the transformer blocks (patch and text embeddings, timestep and RoPE tables, the final layer) run
replicated, on every rank, on the whole sequence. Every transformer block runs on this rank's token shard only:
ComfyUI's block replacement (``transformer_options["patches_replace"]["dit"][(kind, i)]``, the hook its Flux and
Wan models look up before each block) hands :class:`ShardedBlock` the block's inputs; it cuts the tokens, the
RoPE table (``pe``) by the same global positions, runs the block on the shard (projections, MLP, modulation on
``S / world`` tokens), and all-gathers the shard outputs back into the whole sequence for what comes next
(ControlNet additions, the text/image concatenation, the next block). Inside the block, self-attention goes
through :meth:`fastattn.parallel.SequenceParallel.attend` with the shard's global positions (Ulysses all-to-all
and/or ring), so every query still sees every key; cross-attention (Wan's text) needs no exchange and runs the
host's attention on the shard.

Where the tokens are (the shard of each rank, its ``positions``):

- Flux (``[txt, img]`` joint sequence): the double blocks take text and image streams apart, so a rank holds a
  slice of each (text spread as evenly as possible, image filling to ``S / world``); its local sequence is
  ``[its text, its image]`` and the single blocks take the same tokens out of the joined sequence.
- Wan (video tokens only): consecutive token ranges.
- With a ring (``ring > 1``) and ``balance="db-sp"``: the whole kernel blocks db-SP assigns to each rank
  (:meth:`SequenceParallel.positions`), the same for every block.

A block whose inputs are not what this module expects (another sequence length, a per-frame modulation, a shard
length equal to the text length so self- and cross-attention could not be told apart) runs replicated on every
rank with the host's attention, counted with the reason: every rank sees the same whole inputs, so every rank
makes the same choice.
"""

from __future__ import annotations

from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ...attention.runtime import sdpa_dense
from ...parallel.comm import all_gather
from .calls import PARAMS, HostCall, bind

OVERRIDE = "optimized_attention_override"
REPLACE, DIT = "patches_replace", "dit"

# ComfyUI diffusion-model class -> (family, [(block list attribute, patches_replace kind, how the block is cut)])
FAMILIES = {
    "Flux": (
        "flux",
        [("double_blocks", "double_block", "joint"), ("single_blocks", "single_block", "single")],
    ),
    "WanModel": ("wan", [("blocks", "double_block", "video")]),
}
# Wan's image-to-video cross-attention reads the 257 CLIP image tokens apart from the text
_WAN_CLIP_TOKENS = 257

ACTIVE: ContextVar = ContextVar("fastattn_multigpu_forward", default=None)
_CALL: ContextVar = ContextVar("fastattn_multigpu_call", default=None)


class ShardError(RuntimeError):
    """A sharded block met an attention call it cannot serve (on every rank alike)."""


def family_blocks(diffusion_model) -> tuple[str, list[tuple[str, int, str]]] | None:
    """``(family, [(kind, index, cut)...])`` of the model's transformer blocks in forward order, or None when
    Multi-GPU does not know how to cut this model (its exact class, not a subclass that may run other code)."""
    spec = FAMILIES.get(type(diffusion_model).__name__)
    if spec is None:
        return None
    family, lists = spec
    blocks = []
    for attr, kind, cut in lists:
        for i in range(len(getattr(diffusion_model, attr, None) or ())):
            blocks.append((kind, i, cut))
    return (family, blocks) if blocks else None


def host_dense(query, key, value, attn_mask=None, scale=None):
    """The runtime's exact dense attention on ``[B, S, H, D]``: the host's own attention function of the call
    in flight (every rank runs the same one), on this rank's heads."""
    current = _CALL.get()
    if current is None:
        return sdpa_dense(query, key, value, attn_mask, scale)
    func, call = current
    named = bind(call.args, call.kwargs)
    extra = {k: v for k, v in call.kwargs.items() if k not in PARAMS}
    out = func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), query.shape[2],
               mask=attn_mask, attn_precision=named["attn_precision"], skip_reshape=True,
               skip_output_reshape=True, **extra)  # fmt: skip
    return out.transpose(1, 2)


@dataclass
class _Call:
    """The host call's original arguments (``host_dense`` passes its keyword arguments on)."""

    args: tuple
    kwargs: dict


@dataclass
class ParallelForward:
    """One diffusion forward on this rank under sequence parallelism.

    Args:
        family: ``"flux"`` or ``"wan"``.
        sp: this rank's SequenceParallel (mesh + runtime).
        state: the runtime's ForwardState of this forward.
        seq_len, text_len: tokens of the joint sequence and of its text part (Wan: 0).
        local: LongTensor ``[S / world]``: global positions of this rank's tokens, in its local order.
        every: LongTensor ``[S]``: every rank's ``local`` in rank order (where the gathered shards go).
    """

    family: str
    sp: object
    state: object
    seq_len: int
    text_len: int
    local: torch.Tensor
    every: torch.Tensor
    notes: Counter = field(default_factory=Counter)

    def __post_init__(self):
        t = self.text_len
        self.text_rows = self.local[self.local < t]
        self.image_rows = self.local[self.local >= t] - t
        self.identity = bool(torch.equal(self.every, torch.arange(self.seq_len)))
        self._device_index: dict = {}

    @property
    def shard_len(self) -> int:
        return int(self.local.numel())

    def _index(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._device_index:
            self._device_index[key] = getattr(self, name).to(device)
        return self._device_index[key]

    # ------------------------------------------------------------------ blocks
    def run_block(self, cut: str, args: dict, run) -> dict:
        """Run one block (``run(args) -> outputs``, the host's block) on this rank's tokens; whole outputs back."""
        why = self._cannot_cut(cut, args)
        if why is not None:
            self.notes[f"block run replicated: {why}"] += 1
            return run(self._with_override(args, ReplicatedOverride(self)))
        local = self._with_override(args, ShardOverride(self))
        if cut == "joint":
            local["txt"] = args["txt"].index_select(1, self._index("text_rows", args["txt"].device))
            local["img"] = args["img"].index_select(1, self._index("image_rows", args["img"].device))
        else:
            local["img"] = args["img"].index_select(1, self._index("local", args["img"].device))
        pe = args.get("pe")
        if pe is not None:
            local["pe"] = pe.index_select(self._pe_dim(cut), self._index("local", pe.device))
        out = dict(run(local))
        if cut == "joint":
            whole = self.gather(torch.cat([out["txt"], out["img"]], 1))
            out["txt"], out["img"] = whole[:, : self.text_len], whole[:, self.text_len :]
        else:
            out["img"] = self.gather(out["img"])
        return out

    def _pe_dim(self, cut: str) -> int:
        return 1 if cut == "video" else 2  # Wan's freqs [1, S, 1, D/2, 2, 2]; Flux's pe [B, 1, S, D/2, 2, 2]

    def _cannot_cut(self, cut: str, args: dict) -> str | None:
        s, t = self.seq_len, self.text_len
        img = args.get("img")
        if not isinstance(img, torch.Tensor) or img.dim() != 3:
            return "no [B, L, C] image stream"
        if cut == "joint":
            txt = args.get("txt")
            if (
                not isinstance(txt, torch.Tensor)
                or txt.dim() != 3
                or txt.shape[1] != t
                or img.shape[1] != s - t
            ):
                return f"streams of {getattr(txt, 'shape', None)} / {tuple(img.shape)}, expected {t} + {s - t} tokens"
        elif img.shape[1] != s:
            return f"{img.shape[1]} tokens, the forward has {s}"
        pe = args.get("pe")
        dim = self._pe_dim(cut)
        if pe is not None and (not isinstance(pe, torch.Tensor) or pe.dim() <= dim or pe.shape[dim] != s):
            return f"positional table of shape {tuple(getattr(pe, 'shape', ()))} (expected {s} positions at dim {dim})"
        if cut == "video":
            vec = args.get("vec")
            if isinstance(vec, torch.Tensor) and vec.dim() == 4 and vec.shape[1] > 1:
                return "per-frame modulation (the block expands it over the whole sequence)"
            ctx = args.get("txt")
            n = int(ctx.shape[1]) if isinstance(ctx, torch.Tensor) and ctx.dim() == 3 else -1
            if self.shard_len in (n, _WAN_CLIP_TOKENS, n - _WAN_CLIP_TOKENS):
                return f"the shard's {self.shard_len} tokens equal a cross-attention length (self/cross ambiguous)"
        return None

    @staticmethod
    def _with_override(args: dict, override) -> dict:
        local = dict(args)
        to = dict(args.get("transformer_options") or {})
        to[OVERRIDE] = override
        local["transformer_options"] = to
        return local

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """``[B, S / world, C]`` shards of every rank -> ``[B, S, C]`` in global token order."""
        mesh = self.sp.mesh
        parts = all_gather(shard.contiguous(), mesh.world_group, mesh.world_size, "gathering a block's output",
                           mesh.config.timeout_s)  # fmt: skip
        joined = torch.cat(parts, 1)
        if self.identity:
            return joined
        whole = torch.empty_like(joined)
        whole.index_copy_(1, self._index("every", joined.device), joined)
        return whole

    # ------------------------------------------------------------------ attention
    def attend(self, func, args: tuple, kwargs: dict):
        """A self-attention call of a sharded block: every rank's shard through SequenceParallel."""
        call = HostCall.parse(args, kwargs, lambda: func(*args, **kwargs))
        problem = call.shape_problem()
        if problem is None and (call.q_len != self.shard_len or call.k_len != self.shard_len):
            return func(*args, **kwargs)  # cross-attention: the text is whole on every rank
        if problem is None:
            problem = _unservable(call)
        if problem is not None:
            raise ShardError(f"fastattn Multi-GPU: a self-attention call of a sharded block cannot be served "
                             f"({problem})")  # fmt: skip
        q, k, v = call.bshd()
        token = _CALL.set((func, _Call(args, kwargs)))
        try:
            out = self.sp.attend(self.state, q, k, v, call.mask, call.scale, positions=self.local)
        finally:
            _CALL.reset(token)
        return call.to_host(out)


def _unservable(call: HostCall) -> str | None:
    q, k, v = call.q, call.k, call.v
    v_channels = v.shape[-1] if v.dim() == q.dim() else v.shape[-2] * v.shape[-1]
    if call.kwargs.get("enable_gqa") or k.shape[-1] != q.shape[-1] or v_channels != q.shape[-1]:
        return "grouped-query attention"
    if call.skip_reshape and (k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]):
        return "grouped-query attention"
    if call.head_dim is None:
        return f"{q.shape[-1]} channels do not split into {call.heads} heads"
    return None


class ShardOverride:
    """``optimized_attention_override`` inside a sharded block (on top of any other: the workers have no other,
    so rank 0 must not use one either)."""

    def __init__(self, forward: ParallelForward):
        self.forward = forward

    def __call__(self, func, *args, **kwargs):
        return self.forward.attend(func, args, kwargs)


class ReplicatedOverride:
    """Inside a block that runs replicated: the host's attention on every rank; self-attention calls keep the
    layer numbering of the plan."""

    def __init__(self, forward: ParallelForward):
        self.forward = forward

    def __call__(self, func, *args, **kwargs):
        call = HostCall.parse(args, kwargs, None)
        if call.shape_problem() is None and call.q_len == call.k_len == self.forward.seq_len:
            self.forward.state.layer_counter += 1
        return func(*args, **kwargs)


class ShardedBlock:
    """One block's ``patches_replace`` entry: ``entry(args, {"original_block": run}) -> outputs``.

    Outside a parallel forward it passes the call on (to the entry it was installed over, else the block)."""

    def __init__(self, kind: str, index: int, cut: str, previous=None):
        self.kind, self.index, self.cut = kind, index, cut
        self.previous = previous

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: clones share the entry
        return self

    def __copy__(self):
        return self

    def __call__(self, args, extra):
        forward = ACTIVE.get()
        if forward is None:
            if self.previous is not None:
                return self.previous(args, extra)
            return extra["original_block"](args)
        return forward.run_block(self.cut, args, extra["original_block"])


def block_entries(blocks: list[tuple[str, int, str]], existing: dict | None = None) -> dict:
    """``patches_replace["dit"]`` with a :class:`ShardedBlock` for every block, over ``existing`` entries (ours
    replaced, others kept below ours)."""
    dit = dict(existing or {})
    for kind, i, cut in blocks:
        previous = dit.get((kind, i))
        while isinstance(previous, ShardedBlock):
            previous = previous.previous
        dit[(kind, i)] = ShardedBlock(kind, i, cut, previous)
    return dit


# ---------------------------------------------------------------------------------------------- positions
def contiguous_positions(seq_len: int, text_len: int, world: int, rank: int) -> torch.Tensor:
    """This rank's tokens without balancing: a slice of the text (spread as evenly as possible) then a slice of
    the image, ``seq_len / world`` tokens in all (Wan: ``text_len`` 0, consecutive ranges)."""
    n = seq_len // world
    text = [text_len // world + (r < text_len % world) for r in range(world)]
    image = [n - c for c in text]
    if seq_len % world or min(image) < 0:
        raise ValueError(f"{seq_len} tokens ({text_len} text) do not cut into {world} equal shards")
    t0, i0 = sum(text[:rank]), sum(image[:rank])
    return torch.cat([torch.arange(t0, t0 + text[rank]), text_len + torch.arange(i0, i0 + image[rank])])


def local_order(positions: torch.Tensor, text_len: int) -> torch.Tensor:
    """``positions`` in a block's local order: the text tokens first, then the image tokens (each ascending)."""
    positions = positions.long().cpu()
    text = positions[positions < text_len].sort().values
    image = positions[positions >= text_len].sort().values
    return torch.cat([text, image])
