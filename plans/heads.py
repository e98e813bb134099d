"""Per-head plans: which method, axis order, bit-width and reuse action each head runs, per step group and layer.

A :class:`HeadTable` is a palette of method configs plus small integer tensors indexed
``[step group, layer, head]``. Calibrated plans (PARO: per-head axis order + block mask; Sparse-vDiT:
diagonal / multi-diagonal / stripes / skipped heads; DiTFastAttn-v2: arrow windows + head-wise reuse) are
tables; a structural preset is the special case "one method for every head" and needs no table.

A ``blockmap`` head (PARO's calibrated mask) reads its blocks from ``block_maps`` (bool ``[M, n, n]``, the
calibrated layout's ``n`` blocks, in the head's axis order), row ``map_index[g, l, h]``: the maps are data of
the table, saved beside the index tensors (bit-packed in the file, see :mod:`fastattn.plans.files`).
:func:`unique_maps` stores identical maps once (many heads, layers and step groups end on the same map).

Tensors, not Python lists per layer: the table is saved as-is in a plan file's safetensors, and the
runtime turns each distinct (group, layer) row into one cached piece of per-head work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..attn_kernels.quantize import MODES as QUANT_MODES
from ..masks.layout import AXIS_ORDERS, BlockGeometry, TokenLayout
from .methods import BlockMapConfig, MethodConfig

# quant index -1: the plan's own ``quant``; map index -1: the head has no block map
QUANT_FROM_PLAN = -1
NO_MAP = -1
# per-head tensors [G, L, H], in the order of a head's key (reuse last); then the table's other tensors
TABLE_TENSORS = ("method_index", "order_index", "quant_index", "map_index", "reuse")
_DEFAULTS = {"order_index": 0, "quant_index": QUANT_FROM_PLAN, "map_index": NO_MAP, "reuse": False}
STORED_TENSORS = TABLE_TENSORS + ("block_maps",)
# what each stored tensor holds: "index" (signed or unsigned integers) or "bool"
TENSOR_KINDS = {"method_index": "index", "order_index": "index", "quant_index": "index", "map_index": "index",
                "reuse": "bool", "block_maps": "bool"}  # fmt: skip


@dataclass(frozen=True, eq=False)
class HeadTable:
    """Per (step group, layer, head) work.

    Args:
        methods: palette of method configs; ``method_index`` points into it.
        method_index: int ``[G, L, H]``.
        step_bounds: ``G + 1`` increasing fractions of the run from 0.0 to 1.0; group ``g`` serves the
            steps whose progress ``step / num_steps`` is in ``[step_bounds[g], step_bounds[g + 1])``.
            Without a known step count every step is in group 0.
        order_index: int ``[G, L, H]`` into ``AXIS_ORDERS`` (0 = ``"FHW"``, the model's own order):
            the head attends over its tokens reordered (PARO); ``None``: no reordering.
        quant_index: int ``[G, L, H]`` into the kernel's quant modes, ``-1`` for the plan's ``quant``;
            ``None``: the plan's ``quant`` everywhere.
        reuse: bool ``[G, L, H]``: the head returns its output of the latest step it computed (same layer
            and CFG pass) instead of attending (DiTFastAttn-v2 head-wise reuse); ``None``: never.
        map_index: int ``[G, L, H]`` into ``block_maps`` for the ``blockmap`` heads, ``-1`` elsewhere.
        block_maps: bool ``[M, n, n]``: per map, the key blocks of each query block (``n`` blocks of the
            calibrated layout at the plan's ``block_size``, in the head's axis order).
    """

    methods: tuple[MethodConfig, ...]
    method_index: torch.Tensor
    step_bounds: tuple[float, ...] = (0.0, 1.0)
    order_index: torch.Tensor | None = None
    quant_index: torch.Tensor | None = None
    reuse: torch.Tensor | None = None
    map_index: torch.Tensor | None = None
    block_maps: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "step_bounds", tuple(float(b) for b in self.step_bounds))
        if not self.methods or not all(isinstance(m, MethodConfig) for m in self.methods):
            raise TypeError("heads.methods must be a non-empty list of method configs")
        if any(m.dynamic for m in self.methods):
            raise ValueError("per-head tables take structural methods; 'dynamic' runs as the plan's method")
        shape = _check_int_table("method_index", self.method_index, None, 0, len(self.methods) - 1)
        if len(shape) != 3:
            raise ValueError(f"heads.method_index must be [groups, layers, heads], got shape {shape}")
        _check_int_table("order_index", self.order_index, shape, 0, len(AXIS_ORDERS) - 1)
        _check_int_table("quant_index", self.quant_index, shape, QUANT_FROM_PLAN, len(QUANT_MODES) - 1)
        if self.reuse is not None:
            if not isinstance(self.reuse, torch.Tensor) or self.reuse.dtype != torch.bool:
                raise TypeError("heads.reuse must be a bool tensor [groups, layers, heads]")
            if tuple(self.reuse.shape) != shape:
                raise ValueError(f"heads.reuse has shape {tuple(self.reuse.shape)}, method_index {shape}")
        self._check_maps(shape)
        b = self.step_bounds
        if len(b) != shape[0] + 1 or b[0] != 0.0 or b[-1] != 1.0 or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(
                f"heads.step_bounds must be {shape[0] + 1} increasing fractions from 0.0 to 1.0 "
                f"(one more than the {shape[0]} step groups), got {list(b)}"
            )
        # One key per (group, layer): the runtime caches per-head work by it (uniform layers share).
        keys = []
        for g in range(shape[0]):
            row = []
            for layer in range(shape[1]):
                row.append(tuple(zip(*(self._column(name, g, layer) for name in TABLE_TENSORS))))
            keys.append(row)
        object.__setattr__(self, "_keys", keys)

    def _check_maps(self, shape) -> None:
        """``blockmap`` heads need a map, maps need ``blockmap`` heads; every query block keeps a key block."""
        maps, index = self.block_maps, self.map_index
        uses = torch.zeros(shape, dtype=torch.bool)
        for i, m in enumerate(self.methods):
            if isinstance(m, BlockMapConfig):
                uses |= self.method_index == i
        if maps is None:
            if index is not None:
                raise ValueError("heads.map_index is given without heads.block_maps")
            if uses.any():
                raise ValueError("heads use method 'blockmap' but the table has no block_maps / map_index")
            return
        if not isinstance(maps, torch.Tensor) or maps.dtype != torch.bool:
            raise TypeError(f"heads.block_maps must be a bool tensor [maps, blocks, blocks], not {_kind(maps)}")
        if maps.dim() != 3 or maps.shape[1] != maps.shape[2] or 0 in maps.shape:
            raise ValueError(
                f"heads.block_maps must be [maps, blocks, blocks] (square, non-empty), got {tuple(maps.shape)}"
            )
        if index is None:
            raise ValueError("heads.block_maps is given without heads.map_index ([groups, layers, heads])")
        _check_int_table("map_index", index, shape, NO_MAP, maps.shape[0] - 1)
        if bool((uses & (index < 0)).any()):
            raise ValueError("a 'blockmap' head has map_index -1: each blockmap head needs a block map")
        if bool((~uses & (index >= 0)).any()):
            raise ValueError("heads.map_index names a block map for a head whose method is not 'blockmap'")
        empty = ~maps.any(-1)
        if bool(empty.any()):
            m, q = empty.nonzero()[0].tolist()
            raise ValueError(
                f"heads.block_maps[{m}] leaves query block {q} with no key block (its output would be zeros)"
            )

    @property
    def map_blocks(self) -> int | None:
        """Blocks per side of the block maps (``None``: no maps)."""
        return None if self.block_maps is None else self.block_maps.shape[-1]

    def check_layout(self, layout: TokenLayout, block_size: int) -> None:
        """Raise unless the block maps (if any) fit ``layout`` cut into ``block_size`` blocks."""
        n = self.map_blocks
        if n is None:
            return
        have = BlockGeometry(layout, block_size).num_blocks
        if have != n:
            raise ValueError(
                f"the plan's block maps are {n} x {n} blocks; seq_len {layout.seq_len} (text {layout.text_len}, "
                f"grid {layout.grid}) in blocks of {block_size} has {have}: block maps only fit the layout they "
                "were calibrated at"
            )

    def _column(self, name: str, g: int, layer: int) -> list:
        t = getattr(self, name)
        if t is None:
            default = _DEFAULTS[name]
            return [default] * self.num_heads
        return t[g, layer].tolist()

    @property
    def num_groups(self) -> int:
        return self.method_index.shape[0]

    @property
    def num_layers(self) -> int:
        return self.method_index.shape[1]

    @property
    def num_heads(self) -> int:
        return self.method_index.shape[2]

    def group_of(self, step: int, num_steps: int | None) -> int:
        if not num_steps or self.num_groups == 1:
            return 0
        p = step / num_steps
        for g in range(self.num_groups):
            if p < self.step_bounds[g + 1]:
                return g
        return self.num_groups - 1

    def heads_at(self, group: int, layer: int) -> tuple[tuple[int, int, int, int, bool], ...]:
        """Per head ``(method index, order index, quant index, map index, reuse)`` (a hashable cache key)."""
        return self._keys[group][layer]

    def reuses_anywhere(self, layer: int) -> bool:
        return self.reuse is not None and bool(self.reuse[:, layer].any())

    def check_model(self, num_layers: int, num_heads: int | None) -> None:
        if self.num_layers != num_layers:
            raise ValueError(f"the plan's head table covers {self.num_layers} layers, the model has {num_layers}")
        if num_heads is not None and self.num_heads != num_heads:
            raise ValueError(f"the plan's head table covers {self.num_heads} heads, the model has {num_heads}")

    @classmethod
    def uniform(cls, method: MethodConfig, num_layers: int, num_heads: int) -> HeadTable:
        return cls((method,), torch.zeros(1, num_layers, num_heads, dtype=torch.int16))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The table's tensors by name (what a plan file stores in its safetensors)."""
        return {n: getattr(self, n).contiguous() for n in STORED_TENSORS if getattr(self, n) is not None}

    def describe(self) -> dict:
        counts: dict[str, int] = {}
        for g in range(self.num_groups):
            for layer in range(self.num_layers):
                for m, *_ in self.heads_at(g, layer):
                    counts[self.methods[m].name] = counts.get(self.methods[m].name, 0) + 1
        return {
            "groups": self.num_groups,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "step_bounds": list(self.step_bounds),
            "head_methods": counts,
            "reordered_heads": int((self.order_index != 0).sum()) if self.order_index is not None else 0,
            "reuse_heads": int(self.reuse.sum()) if self.reuse is not None else 0,
            "block_maps": 0 if self.block_maps is None else self.block_maps.shape[0],
        }


def unique_maps(block_maps: torch.Tensor, map_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Identical block maps stored once: ``(maps, map_index)``.

    ``block_maps``: bool ``[M, n, n]``; ``map_index``: int ``[G, L, H]`` into it, ``-1`` for no map. Each
    distinct map is kept at its first occurrence, in order (a table without duplicates comes back as it was),
    and ``map_index`` (same dtype) points into the kept maps. Maps no head names are kept too.
    """
    first: dict[bytes, int] = {}  # digest of a map -> its row among the kept maps
    keep: list[int] = []
    new_row: list[int] = []
    for i, m in enumerate(block_maps):
        # a digest as the key, not the map's bytes: a map holds n * n bytes (a MiB at n = 1024)
        key = hashlib.sha256(m.detach().cpu().contiguous().numpy().tobytes()).digest()
        if key not in first:
            first[key] = len(keep)
            keep.append(i)
        new_row.append(first[key])
    if len(keep) == len(block_maps):
        return block_maps, map_index
    rows = torch.tensor(new_row, dtype=map_index.dtype, device=map_index.device)
    index = torch.where(map_index >= 0, rows[map_index.clamp_min(0).long()], map_index)
    return block_maps[keep], index


def _kind(x) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_int_table(name, t, shape, lo: int, hi: int):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"heads.{name} must be an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"heads.{name} must be an integer tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"heads.{name} has shape {tuple(t.shape)}, method_index has {shape}")
    if t.numel() == 0:
        raise ValueError(f"heads.{name} is empty (shape {tuple(t.shape)})")
    if int(t.min()) < lo or int(t.max()) > hi:
        raise ValueError(f"heads.{name} holds values outside [{lo}, {hi}] (min {int(t.min())}, max {int(t.max())})")
    return tuple(t.shape)
