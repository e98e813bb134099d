"""The Fast Attention Multi-GPU node's logic as plain functions (the thin V3 class is in ``comfy_nodes.py``).

:func:`apply_multigpu` (MODEL -> MODEL): a ``clone()`` of the model whose diffusion forwards run under sequence
parallelism on several devices: the ComfyUI process is rank 0 on the device ComfyUI runs the model on, and one
worker process per extra device joins it (``host/multigpu_cluster.py``). The ordinary KSampler drives it; the
input MODEL is never changed. Works with the Fast Attention node on the same model (its plan runs on every
rank) in either order.

:func:`parse_devices`: ``"all"``, ``"0,1"``, ``"cuda:0,cuda:2"`` or ``"cpu,cpu"`` (CPU ranks over gloo: a CPU-only
host, tests) -> :class:`~.host.multigpu_cluster.DeviceList`, with errors that say what was expected and what this
machine has.

Errors a user can fix are :class:`~.fast_attention.NodeError`: ComfyUI shows them on the node.
"""

from __future__ import annotations

import re

import torch

from ..parallel.config import AUTO, ParallelConfig
from .fast_attention import NodeError, diffusion_model_of
from .host.families import detect_family
from .host.multigpu import MultiGPUPatch, install
from .host.multigpu_cluster import DeviceList
from .host.multigpu_shard import FAMILIES, family_blocks

DEGREES = (AUTO, "1", "2", "3", "4", "6", "8")
SUPPORTED = "Flux (FLUX.1 dev/schnell) and Wan 2.1/2.2 (WanModel: text/image-to-video)"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(text: str, main_device=None, cuda_count: int | None = None) -> DeviceList:
    """The ranks' devices for ``text``; rank 0 is ``main_device`` (where ComfyUI runs the model).

    ``"all"``: every CUDA device this process sees. ``"0,1,3"`` / ``"cuda:0,cuda:1"``: those CUDA devices; one of
    them must be ComfyUI's. ``"cpu,cpu"``: that many CPU ranks (gloo), with ComfyUI on the CPU (``--cpu``).
    """
    if not isinstance(text, str) or not text.strip():
        raise NodeError("devices is empty: write 'all', GPU indices like '0,1', or CPU ranks like 'cpu,cpu'")
    count = _cuda_count() if cuda_count is None else cuda_count
    main = torch.device(main_device) if main_device is not None else None
    have = f"this machine has {count} CUDA device(s)" + (f" (0-{count - 1})" if count else "")
    spec = text.strip().lower()
    if spec == "all":
        if count == 0:
            raise NodeError(f"devices 'all': {have}; on a CPU-only machine list CPU ranks, e.g. 'cpu,cpu'")
        gpus = list(range(count))
    else:
        items = [p.strip() for p in spec.split(",") if p.strip()]
        cpus = [p for p in items if p == "cpu"]
        gpus = []
        for item in items:
            if item == "cpu":
                continue
            m = re.fullmatch(r"(?:cuda:)?(\d+)", item)
            if m is None:
                raise NodeError(f"devices: {item!r} is not a GPU index (e.g. 0 or cuda:0) or 'cpu'")
            gpus.append(int(m.group(1)))
        if cpus and gpus:
            raise NodeError("devices: list GPUs or CPU ranks, not both (all ranks must use one backend)")
        if cpus:
            if len(cpus) < 2:
                raise NodeError(f"devices {text!r} is one rank; Multi-GPU needs at least 2 (e.g. 'cpu,cpu')")
            if main is not None and main.type != "cpu":
                raise NodeError(f"devices {text!r}: ComfyUI runs this model on {main}; CPU ranks need ComfyUI "
                                "started with --cpu")  # fmt: skip
            return DeviceList("cpu", (None,) * len(cpus))
        dupes = sorted({g for g in gpus if gpus.count(g) > 1})
        if dupes:
            raise NodeError(f"devices: GPU {dupes} listed twice; each GPU runs one rank")
        missing = [g for g in gpus if g >= count]
        if missing:
            raise NodeError(
                f"devices {text!r} asks for {len(gpus)} GPUs but {have}: GPU {missing} does not exist"
            )
    if main is None or main.type != "cuda":
        raise NodeError(f"devices {text!r}: ComfyUI runs this model on {main or 'an unknown device'}, not a CUDA GPU; "
                        "use CPU ranks ('cpu,cpu') or run ComfyUI on a GPU")  # fmt: skip
    first = main.index if main.index is not None else torch.cuda.current_device()
    if first not in gpus:
        raise NodeError(f"devices {text!r} must include cuda:{first}, the GPU ComfyUI runs this model on (rank 0 "
                        "is the ComfyUI process)")  # fmt: skip
    if len(gpus) < 2:
        raise NodeError(f"devices {text!r} is one GPU; Multi-GPU needs at least 2")
    return DeviceList("cuda", (first, *[g for g in gpus if g != first]))


def parse_degree(name: str, value) -> int | str:
    if value == AUTO or value is None:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise NodeError(f"{name} must be 'auto' or a positive integer, got {value!r}") from None
    if n < 1:
        raise NodeError(f"{name} must be 'auto' or a positive integer, got {value!r}")
    return n


def apply_multigpu(model, devices: str = "all", ulysses="auto", ring="auto", balance: bool = True,
                   timeout_s: float = 300.0, *, cuda_count: int | None = None):  # fmt: skip
    """A ``clone()`` of ``model`` whose diffusion forwards run on ``devices`` (the Fast Attention Multi-GPU node).

    Raises NodeError for a model Multi-GPU cannot cut, a bad device list, fewer devices than asked, or degrees
    that do not fit the devices and the model's heads."""
    dm = diffusion_model_of(model)
    cut = family_blocks(dm)
    family, reason = detect_family(dm)
    if cut is None or family is None:
        name = type(dm).__name__
        why = f" ({reason})" if reason else ""
        raise NodeError(f"Multi-GPU does not support {name} yet{why}; supported: {SUPPORTED} "
                        f"(classes {sorted(FAMILIES)})")  # fmt: skip
    shard_family, blocks = cut
    main = getattr(model, "load_device", None)
    device_list = parse_devices(devices, main, cuda_count)
    if not torch.distributed.is_available() or (
        device_list.kind == "cuda" and not torch.distributed.is_nccl_available()
    ):
        raise NodeError(
            f"this PyTorch build has no {device_list.backend} (torch.distributed); Multi-GPU needs it"
        )
    try:
        config = ParallelConfig(parse_degree("ulysses", ulysses), parse_degree("ring", ring),
                                "db-sp" if balance else "none", timeout_s)  # fmt: skip
        u, r = config.degrees(device_list.world, family.num_heads)
    except ValueError as e:
        raise NodeError(
            f"{e} (devices {devices!r}: {device_list.world} ranks; {family.num_heads} heads)"
        ) from None
    config = ParallelConfig(u, r, config.balance, config.timeout_s)
    patch = MultiGPUPatch(device_list, config, family, shard_family, blocks)
    patched = model.clone()
    install(patched, patch)
    return patched
