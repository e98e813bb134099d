"""Plan files: a plan as a folder of data, never code.

A plan directory holds two files:

* ``plan.json`` -- a small UTF-8 JSON header::

      {"format": "fastattn-plan", "format_version": 1 or 2,
       "plan": {flat settings: AttentionPlan.to_dict(), e.g. "method": "window3d", "density": 0.2, ...},
       "heads": null | {"methods": [describe(m), ...],        # the head table's palette
                        "step_bounds": [0.0, ..., 1.0],       # G + 1 fractions of the run
                        "tensors": ["method_index", ...]},    # names stored in plan.safetensors
       "meta": PlanMeta.to_dict()}                            # model fingerprint, layout, provenance

* ``plan.safetensors`` -- only when ``heads`` is not null: the head table's tensors, each ``[G, L, H]``
  (``method_index`` / ``order_index`` / ``quant_index`` / ``map_index``: signed int8-int64 or uint8;
  ``reuse``: bool), and ``block_maps_bits`` when the table has ``blockmap`` heads: its block maps
  (``HeadTable.block_maps``, bool ``[M, n, n]``) bit-packed along the key-block axis as uint8
  ``[M, n, ceil(n / 8)]``, little-endian bit order -- key block ``k`` of a row is bit ``k % 8`` (value
  ``1 << (k % 8)``) of byte ``k // 8``, and the padding bits past key block ``n - 1`` are zero. Identical maps
  are stored once (:func:`~fastattn.plans.heads.unique_maps`; ``map_index`` is remapped). A file with packed
  maps says ``format_version`` 2, so a fastattn that predates the packing refuses it by name instead of
  failing on an unknown tensor; every other file says 1 and stays readable there. Files written before the
  packing hold bool ``block_maps`` ``[M, n, n]`` instead; both load into the same bool ``[M, n, n]``.
  ``meta.tensors_sha256`` is its sha256. A plan without a head table has no ``plan.safetensors``
  (``save_plan`` removes a stale one; loading never reads it). The file holds at most ``MAX_TENSORS_BYTES``
  (64 MiB): a map of ``n`` blocks a side takes ``n * ceil(n / 8)`` bytes (8 KiB at ``n = 256``, 106 KiB at
  ``n = 929``); ``save_plan`` refuses a larger table, saying its size.

Loading never unpickles: the JSON is parsed with caps on size and nesting, NaN/Infinity and duplicate keys
refused; the safetensors header is checked (names, dtypes, shapes, offsets, sizes) before
``safetensors.torch.load`` reads the bytes, and the table is validated by :class:`HeadTable`. Anything
else raises :class:`PlanFileError` naming the file and what was expected, before anything is returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..masks.layout import TokenLayout
from .heads import TABLE_TENSORS, TENSOR_KINDS, HeadTable, unique_maps
from .meta import ModelFingerprint, PlanMeta
from .methods import describe, method_from_name
from .schema import AttentionPlan

PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"
FORMAT = "fastattn-plan"
FORMAT_VERSION = 2  # the newest this writes: 2 when block maps are bit-packed, else 1 (see the docstring)
READ_VERSIONS = (1, 2)
MAX_JSON_BYTES = 1 << 20  # a header is a few KiB; a calibrated palette a few hundred entries
MAX_JSON_DEPTH = 16
# Loading reads the whole file and unpacks maps 8 bytes per stored byte: 64 MiB is at most 512 MiB in memory.
MAX_TENSORS_BYTES = 64 << 20
MAX_ST_HEADER_BYTES = 64 << 10
MAX_TABLE_DIM = 1 << 14  # per axis of [G, L, H]
MAX_PALETTE = 1024
_INDEX_DTYPES = {"I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1}  # safetensors dtype -> bytes per element
_KIND_DTYPES = {"index": _INDEX_DTYPES, "bool": {"BOOL": 1}}
PACKED_MAPS = "block_maps_bits"  # the table's block_maps, 8 key blocks a byte
_TENSOR_DTYPES = {name: _KIND_DTYPES[kind] for name, kind in TENSOR_KINDS.items()} | {PACKED_MAPS: {"U8": 1}}
# what plan.safetensors may hold: the table's [G, L, H] tensors and its maps, packed or (older files) bool
FILE_TENSORS = TABLE_TENSORS + (PACKED_MAPS, "block_maps")
_SHAPES = {PACKED_MAPS: "[maps, blocks, ceil(blocks / 8)]", "block_maps": "[maps, blocks, blocks]"}
_HEADER_KEYS = {"format", "format_version", "plan", "heads", "meta"}
_HEADS_KEYS = {"methods", "step_bounds", "tensors"}
GRID_METHODS = frozenset({"window3d", "radial", "multi_diagonal"})  # methods whose masks follow the grid
QUANT_BITS = {"none": 16, "int8": 8, "int8-fp8": 8, "fp8": 8, "int4": 4, "int4-fp8": 4}


class PlanFileError(ValueError):
    """A plan file that is not what fastattn writes; the message names the file and what was expected."""


class PlanMismatchError(ValueError):
    """A valid plan made for another model (family, layers, heads, head_dim) or layout."""


@dataclass
class LoadedPlan:
    """A loaded plan and what its file said. ``source``: what was asked for; ``commit``: the Hub commit it
    was read from (``hf://`` sources); ``adapted``: what ``adapt=True`` let through (layout changes)."""

    plan: AttentionPlan
    meta: PlanMeta
    source: str
    adapted: list[str] = field(default_factory=list)
    commit: str | None = None


# ------------------------------------------------------------------------------------------------ save


def save_plan(plan: AttentionPlan, directory, meta: PlanMeta | None = None) -> Path:
    """Write ``plan`` as ``directory/plan.json`` (+ ``plan.safetensors`` when it has a head table).

    ``meta.tensors_sha256`` is filled in; identical block maps are stored once. The files are read back
    through :func:`load_plan` before returning, so nothing is written that cannot be loaded. Returns the
    directory. Raises ``ValueError`` (writing nothing) when the head table's tensors would take more than
    ``MAX_TENSORS_BYTES``.
    """
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"save_plan takes an AttentionPlan, got {type(plan).__name__}")
    meta = meta if meta is not None else PlanMeta()
    if not isinstance(meta, PlanMeta):
        raise TypeError(f"meta must be a PlanMeta or None, got {type(meta).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = None
    heads = None
    if plan.heads is not None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in plan.heads.tensors().items()}
        maps = tensors.pop("block_maps", None)
        if maps is not None:
            maps, tensors["map_index"] = unique_maps(maps, tensors["map_index"])
            tensors[PACKED_MAPS] = pack_block_maps(maps)
        blob = save(tensors)
        if len(blob) > MAX_TENSORS_BYTES:
            raise ValueError(_too_large(len(blob), maps))
        heads = {"methods": [describe(m) for m in plan.heads.methods], "step_bounds": list(plan.heads.step_bounds),
                 "tensors": sorted(tensors)}  # fmt: skip
    meta = dataclasses.replace(meta, tensors_sha256=hashlib.sha256(blob).hexdigest() if blob else None)
    version = FORMAT_VERSION if heads is not None and PACKED_MAPS in heads["tensors"] else 1
    header = {"format": FORMAT, "format_version": version, "plan": plan.to_dict(), "heads": heads,
              "meta": meta.to_dict()}  # fmt: skip
    text = _dumps(header) + "\n"
    if blob is not None:
        _write_atomic(directory / PLAN_TENSORS, blob)
    else:
        (directory / PLAN_TENSORS).unlink(missing_ok=True)
    _write_atomic(directory / PLAN_JSON, text.encode("utf-8"))
    load_plan(directory)
    return directory


def _dumps(obj, indent: int = 0) -> str:
    """JSON with one object key per line and lists of scalars on one line (short, diff-friendly)."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad + _dumps(v, indent + 1) for v in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj, allow_nan=False)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ block maps


def packed_maps_bytes(num_maps: int, num_blocks: int) -> int:
    """Bytes ``num_maps`` block maps of ``num_blocks`` blocks a side take in ``plan.safetensors``."""
    return num_maps * num_blocks * ((num_blocks + 7) // 8)


def pack_block_maps(maps: torch.Tensor) -> torch.Tensor:
    """bool ``[M, n, n]`` -> uint8 ``[M, n, ceil(n / 8)]``: key block ``k`` is bit ``k % 8`` (least
    significant first) of byte ``k // 8``; padding bits past ``n`` are zero."""
    return torch.from_numpy(np.packbits(maps.detach().cpu().numpy(), axis=-1, bitorder="little"))


def unpack_block_maps(bits: torch.Tensor, where: str) -> torch.Tensor:
    """uint8 ``[M, n, ceil(n / 8)]`` (what :func:`pack_block_maps` writes) -> bool ``[M, n, n]``; anything
    else, or a padding bit set, raises :class:`PlanFileError`."""
    if bits.dtype != torch.uint8 or bits.dim() != 3:
        raise PlanFileError(
            f"{where}: {PACKED_MAPS} must be uint8 [maps, blocks, ceil(blocks / 8)], got {bits.dtype} "
            f"{tuple(bits.shape)}"
        )
    _, n, width = bits.shape
    if width != (n + 7) // 8:
        raise PlanFileError(
            f"{where}: {PACKED_MAPS} has shape {tuple(bits.shape)}: rows of {n} key blocks take "
            f"{(n + 7) // 8} bytes, not {width} (expected [maps, {n}, {(n + 7) // 8}])"
        )
    if n % 8:
        stray = (bits[..., -1] >> (n % 8)) != 0
        if bool(stray.any()):
            m, q = stray.nonzero()[0].tolist()
            raise PlanFileError(
                f"{where}: {PACKED_MAPS}[{m}] sets padding bits past key block {n - 1} in query block {q}; "
                "they must be zero (a corrupt file, or not written by fastattn)"
            )
    # unpackbits gives one 0/1 byte per block: the bytes of a bool tensor, viewed without a copy
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=n, bitorder="little")).view(torch.bool)


def _too_large(nbytes: int, maps: torch.Tensor | None) -> str:
    what = f"{PLAN_TENSORS} would take {nbytes} bytes ({nbytes / 2**20:.1f} MiB"
    if maps is not None:
        m, n = maps.shape[0], maps.shape[-1]
        what += (f", of which {m} distinct block maps of {n} x {n} blocks take {packed_maps_bytes(m, n)}: "
                 f"{packed_maps_bytes(1, n)} bytes each")  # fmt: skip
    return (
        f"{what}), more than a plan file may hold ({MAX_TENSORS_BYTES} bytes, {MAX_TENSORS_BYTES >> 20} "
        "MiB). Calibrate with fewer step groups (step_groups=) or a larger block_size (a map of n blocks a "
        "side takes n * ceil(n / 8) bytes), or without 'blockmap' heads"
    )


# ------------------------------------------------------------------------------------------------ load


def load_plan(source, *, fingerprint: ModelFingerprint | None = None, layout: TokenLayout | None = None,
              adapt: bool = False) -> LoadedPlan:  # fmt: skip
    """Load a plan from a directory, its ``plan.json``, or ``hf://owner/repo[/subdir][@revision]``.

    With ``fingerprint`` (the model it is applied to) a plan made for another model is refused
    (:class:`PlanMismatchError` naming what differs); with ``layout`` (the token layout it will run at) a
    grid-based plan made for another layout is refused unless ``adapt=True``, which reports it in
    ``LoadedPlan.adapted``. Hostile or malformed files raise :class:`PlanFileError`.
    """
    commit = None
    if isinstance(source, str) and source.startswith("hf://"):
        from .hub import fetch_plan_file, parse_hf_address

        addr = parse_hf_address(source)
        json_path, commit = fetch_plan_file(addr, PLAN_JSON, max_bytes=MAX_JSON_BYTES)
        label = str(dataclasses.replace(addr, revision=commit or addr.revision))

        def read_tensors() -> tuple[bytes, str]:
            path, _ = fetch_plan_file(addr, PLAN_TENSORS, revision=commit, max_bytes=MAX_TENSORS_BYTES)
            where = f"{label}: {PLAN_TENSORS}"
            return _read_capped(path, MAX_TENSORS_BYTES, "safetensors file", where), where

        json_where = f"{label}: {PLAN_JSON}"
    else:
        json_path = _local_json_path(source)
        tensors_path = json_path.parent / PLAN_TENSORS
        json_where = str(json_path)

        def read_tensors() -> tuple[bytes, str]:
            return _read_capped(tensors_path, MAX_TENSORS_BYTES, "safetensors file"), str(tensors_path)

    header = _parse_json(_read_capped(json_path, MAX_JSON_BYTES, "plan.json header", json_where), json_where)
    plan, meta = _build(header, json_where, read_tensors)
    adapted = check_fingerprint(meta, fingerprint, adapt, layout=layout, plan=plan)
    return LoadedPlan(plan, meta, str(source), adapted, commit)


def _local_json_path(source) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a plan source is a path or 'hf://owner/repo[/subdir][@revision]', got {source!r}")
    p = Path(source)
    if p.is_dir():
        if not (p / PLAN_JSON).exists():
            raise PlanFileError(f"{p}: no {PLAN_JSON} in this directory; expected a fastattn plan directory")
        return p / PLAN_JSON
    if p.name != PLAN_JSON:
        raise PlanFileError(
            f"{p}: expected a plan directory, its {PLAN_JSON}, or hf://owner/repo[/subdir][@revision]"
        )
    if not p.exists():
        raise FileNotFoundError(f"plan file {p} does not exist")
    return p


def is_plan_source(name) -> bool:
    """True for ``hf://...``, a path to a ``plan.json``, or a directory holding one (else a preset name)."""
    if not isinstance(name, (str, os.PathLike)):
        return False
    s = os.fspath(name)
    if s.startswith("hf://"):
        return True
    p = Path(s)
    return p.name == PLAN_JSON or (p / PLAN_JSON).is_file()


def _read_capped(path: Path, cap: int, what: str, where: str | None = None) -> bytes:
    """The bytes of ``path`` (a regular file, symlinks followed), refusing more than ``cap`` bytes."""
    where = where or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PlanFileError(f"{where}: missing; expected a {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PlanFileError(f"{where}: not a regular file; expected a {what}")
    if st.st_size > cap:
        raise PlanFileError(f"{where}: {st.st_size} bytes, more than a {what} may hold ({cap} bytes)")
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise PlanFileError(f"{where}: more than a {what} may hold ({cap} bytes)")
    return data


def _parse_json(data: bytes, where: str):
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, at most ``MAX_JSON_DEPTH`` levels."""
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise PlanFileError(f"{where}: a Python pickle; plan files are JSON + safetensors, never pickle")
    if data[:4] == b"PK\x03\x04":
        raise PlanFileError(f"{where}: a zip archive (torch.save?); expected a JSON plan header")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanFileError(
            f"{where}: not UTF-8 text (bad byte at offset {e.start}); expected JSON"
        ) from None

    def constant(name):
        raise PlanFileError(f"{where}: {name} is not a number a plan may hold (JSON has no NaN/Infinity)")

    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise PlanFileError(f"{where}: duplicate key(s) {dup} in one JSON object")
        return dict(items)

    try:
        obj = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise PlanFileError(f"{where}: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{where}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise PlanFileError(f"{where}: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(o, dict):
            stack.extend((v, depth + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, depth + 1) for v in o)
    return obj


def _object(obj, where: str, keys: set, what: str) -> dict:
    """``obj`` as a JSON object holding exactly ``keys``."""
    if not isinstance(obj, dict):
        raise PlanFileError(f"{where}: {what} must be a JSON object, got {type(obj).__name__}")
    unknown, missing = set(obj) - keys, keys - set(obj)
    if unknown or missing:
        raise PlanFileError(
            f"{where}: {what} has unknown field(s) {sorted(unknown)} / lacks {sorted(missing)}; "
            f"expected exactly {sorted(keys)}"
        )
    return obj


def _build(header, where: str, read_tensors: Callable[[], tuple[bytes, str]]):
    """(plan, meta) from a parsed header; ``read_tensors()`` gives the safetensors bytes when needed."""
    if not isinstance(header, dict):
        raise PlanFileError(f"{where}: expected a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise PlanFileError(f"{where}: format is {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("format_version")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise PlanFileError(
            f"{where}: format_version {version!r} is not one this fastattn reads "
            f"({', '.join(map(str, READ_VERSIONS))}); "
            "a newer fastattn may read it"
        )
    _object(header, where, _HEADER_KEYS, "the header")
    try:
        plan = AttentionPlan.from_dict(header["plan"], f"{where}: plan")
        meta = PlanMeta.from_dict(header["meta"], f"{where}: meta")
    except (TypeError, ValueError) as e:
        raise PlanFileError(str(e)) from None
    if header["heads"] is None:
        if meta.tensors_sha256 is not None:
            raise PlanFileError(f"{where}: meta.tensors_sha256 is set but heads is null (no head table)")
    else:
        methods, bounds, names = _heads_header(header["heads"], where)
        if meta.tensors_sha256 is None:
            raise PlanFileError(f"{where}: a plan with a head table needs meta.tensors_sha256")
        blob, twhere = read_tensors()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != meta.tensors_sha256:
            raise PlanFileError(
                f"{twhere}: sha256 {digest} does not match meta.tensors_sha256 {meta.tensors_sha256} "
                f"in {PLAN_JSON} (a modified or corrupt tensor file)"
            )
        tensors = _load_tensors(blob, names, twhere)
        if PACKED_MAPS in tensors:
            tensors["block_maps"] = unpack_block_maps(tensors.pop(PACKED_MAPS), twhere)
        try:
            table = HeadTable(methods, step_bounds=bounds, **tensors)
        except (TypeError, ValueError) as e:
            raise PlanFileError(f"{twhere}: {e}") from None
        plan = plan.replace(heads=table)
        if meta.layout is not None:
            try:
                table.check_layout(meta.layout, plan.block_size)
            except ValueError as e:
                raise PlanFileError(f"{where}: the plan does not fit its own meta.layout: {e}") from None
    if meta.model is not None and meta.model.num_layers is not None:
        try:
            plan.check_model(meta.model.num_layers, meta.model.num_heads)
        except ValueError as e:
            raise PlanFileError(f"{where}: the plan does not fit its own meta.model: {e}") from None
    return plan, meta


def _heads_header(heads, where: str):
    """(palette configs, step_bounds, tensor names) from the header's ``heads`` object."""
    heads = _object(heads, where, _HEADS_KEYS, "heads")
    palette = heads["methods"]
    if not isinstance(palette, list) or not 0 < len(palette) <= MAX_PALETTE:
        raise PlanFileError(f"{where}: heads.methods must be a list of 1..{MAX_PALETTE} method objects")
    methods = []
    for i, d in enumerate(palette):
        if not isinstance(d, dict) or not isinstance(d.get("method"), str):
            raise PlanFileError(f"{where}: heads.methods[{i}] must be an object with a 'method' name")
        params = {k: v for k, v in d.items() if k != "method"}
        try:
            methods.append(method_from_name(d["method"], **params))
        except (TypeError, ValueError) as e:
            raise PlanFileError(f"{where}: heads.methods[{i}]: {e}") from None
    bounds = heads["step_bounds"]
    if (not isinstance(bounds, list) or not 2 <= len(bounds) <= MAX_TABLE_DIM + 1
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):  # fmt: skip
        raise PlanFileError(f"{where}: heads.step_bounds must be a list of 2..{MAX_TABLE_DIM + 1} numbers")
    names = heads["tensors"]
    if (not isinstance(names, list) or "method_index" not in names or len(set(names)) != len(names)
            or not set(names) <= set(FILE_TENSORS) or {PACKED_MAPS, "block_maps"} <= set(names)):  # fmt: skip
        raise PlanFileError(
            f"{where}: heads.tensors must list distinct names among {list(FILE_TENSORS)} including "
            f"'method_index' (and at most one of {PACKED_MAPS!r} / 'block_maps'), got {names!r}"
        )
    return methods, bounds, names


def _load_tensors(blob: bytes, names: list[str], where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking its header declares exactly ``names`` with the
    expected dtypes, 3-dimensional shapes (``[G, L, H]``, the maps' ``[M, n, n]`` or packed
    ``[M, n, ceil(n / 8)]``) within ``MAX_TABLE_DIM`` and offsets tiling the data exactly."""
    if len(blob) < 8:
        raise PlanFileError(f"{where}: {len(blob)} bytes, truncated (a safetensors file starts with 8)")
    n = int.from_bytes(blob[:8], "little")
    if n > MAX_ST_HEADER_BYTES or 8 + n > len(blob):
        raise PlanFileError(
            f"{where}: declares a {n}-byte header in a {len(blob)}-byte file (at most {MAX_ST_HEADER_BYTES}); "
            "truncated or not a safetensors file"
        )
    header = _parse_json(blob[8 : 8 + n], f"{where} (safetensors header)")
    if not isinstance(header, dict):
        raise PlanFileError(f"{where}: the safetensors header must be a JSON object")
    header = dict(header)
    extra = header.pop("__metadata__", None)
    if extra is not None and not (
        isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values())
    ):
        raise PlanFileError(f"{where}: __metadata__ must map names to strings")
    if set(header) != set(names):
        raise PlanFileError(f"{where}: holds tensors {sorted(header)}, {PLAN_JSON} lists {sorted(names)}")
    data_len = len(blob) - 8 - n
    spans = []
    for name, info in header.items():
        info = _object(info, where, {"dtype", "shape", "data_offsets"}, f"tensor {name!r}")
        sizes = _TENSOR_DTYPES[name]
        if info["dtype"] not in sizes:
            raise PlanFileError(
                f"{where}: tensor {name!r} has dtype {info['dtype']!r}, expected one of {sorted(sizes)}"
            )
        shape = info["shape"]
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_TABLE_DIM for d in shape)):  # fmt: skip
            want = _SHAPES.get(name, "[groups, layers, heads]")
            raise PlanFileError(
                f"{where}: tensor {name!r} has shape {shape!r}, expected {want} each in 1..{MAX_TABLE_DIM}"
            )
        offs = info["data_offsets"]
        nbytes = math.prod(shape) * sizes[info["dtype"]]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len or offs[1] - offs[0] != nbytes):  # fmt: skip
            raise PlanFileError(
                f"{where}: tensor {name!r} data_offsets {offs!r} do not hold its {nbytes} bytes "
                f"within the {data_len} bytes of data (truncated or corrupt)"
            )
        spans.append(tuple(offs))
    spans.sort()
    if spans[0][0] != 0 or spans[-1][1] != data_len or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise PlanFileError(f"{where}: tensor data has gaps, overlaps or trailing bytes (corrupt)")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PlanFileError(f"{where}: not a readable safetensors file ({e})") from None


# ------------------------------------------------------------------------------------------- fingerprint


def check_fingerprint(meta: PlanMeta, fingerprint: ModelFingerprint | None, adapt: bool = False, *,
                      layout: TokenLayout | None = None, plan: AttentionPlan | None = None) -> list[str]:  # fmt: skip
    """Refuse a plan made for another model; returns what ``adapt=True`` let through.

    A difference in family, layers, heads or head_dim (fields both sides know) raises
    :class:`PlanMismatchError` listing them. A different ``layout`` matters only for grid-based plans
    (``window3d``, ``radial``, ``multi_diagonal``, reordered or ``blockmap`` heads; all when ``plan`` is None):
    refused unless ``adapt``, then reported (windows stay in tokens; target densities are re-searched per
    layout). Block maps whose block grid differs from ``layout``'s are refused even with ``adapt``.
    """
    adapted: list[str] = []
    if fingerprint is not None:
        if not isinstance(fingerprint, ModelFingerprint):
            raise TypeError(f"fingerprint must be a ModelFingerprint, got {type(fingerprint).__name__}")
        diffs = meta.model.differences(fingerprint) if meta.model is not None else []
        if diffs:
            made = meta.model.model_class or meta.model.family
            raise PlanMismatchError(
                f"this plan was made for another model ({made}), not this {fingerprint.model_class or fingerprint.family}: "
                + "; ".join(diffs)
            )
        if plan is not None and fingerprint.num_layers is not None:
            try:
                plan.check_model(fingerprint.num_layers, fingerprint.num_heads)
            except ValueError as e:
                raise PlanMismatchError(f"this plan does not fit the model: {e}") from None
    if layout is not None and plan is not None and plan.heads is not None:
        try:
            plan.heads.check_layout(layout, plan.block_size)  # data maps cannot be adapted to other blocks
        except ValueError as e:
            raise PlanMismatchError(f"this plan does not fit this call's layout: {e}") from None
    if layout is not None and meta.layout is not None and layout != meta.layout:
        if plan is None or _grid_bound(plan):
            what = f"plan made for layout {_fmt_layout(meta.layout)}, this call runs {_fmt_layout(layout)}"
            if not adapt:
                raise PlanMismatchError(
                    f"{what}; its methods follow the latent grid. Pass adapt=True to use it anyway "
                    "(windows stay in tokens, densities are re-searched for the new layout)"
                )
            adapted.append(f"layout: {what}")
    return adapted


def _grid_bound(plan: AttentionPlan) -> bool:
    methods = [plan.method] + list(plan.heads.methods if plan.heads is not None else ())
    reordered = (
        plan.heads is not None and plan.heads.order_index is not None and bool(plan.heads.order_index.any())
    )
    maps = plan.heads is not None and plan.heads.block_maps is not None
    return reordered or maps or any(m.name in GRID_METHODS for m in methods)


def _fmt_layout(lay: TokenLayout) -> str:
    text = f"{lay.text_len} text {'first' if lay.text_first else 'last'}" if lay.text_len else "no text"
    return f"(seq_len {lay.seq_len}, {text}, grid {lay.grid})"


# ---------------------------------------------------------------------------------------- shipped presets


def shipped_plans() -> list[Path]:
    """The plan directories shipped under ``presets/plans/``."""
    from ..presets import PRESET_DIR

    root = PRESET_DIR / "plans"
    return sorted(p for p in root.iterdir() if (p / PLAN_JSON).is_file()) if root.is_dir() else []
