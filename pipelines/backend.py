"""Registering fastattn as a diffusers attention backend (``fastattn_sparse``), safely.

diffusers' ``AttentionBackendName`` enum is closed and has no public registration API, so we add one
member to it by hand (the way ``str, Enum`` members are built) and register our function in
``_AttentionBackendRegistry``. Rules we keep: a unique prefixed name, never touching a built-in entry,
idempotent registration, a diffusers version guard (``FASTATTN_ALLOW_UNTESTED_DIFFUSERS=1`` relaxes it
to a warning) and a clear error when the private internals we rely on changed.

The backend receives only tensors. Which model and forward a call belongs to is what the transformer's
context hook (``hooks.py``) put in :data:`ACTIVE` for the running forward: a context variable, so each
thread (and each asyncio task) sees its own forward — two pipelines in two threads never mix.

Gradients (LoRA training, gradient guidance on an enabled pipeline): calls whose tensors need a gradient
run the runtime eagerly instead of through the ``fastattn::runtime_attention`` op, so autograd records the
operations the runtime really ran — SDPA for dense calls (exact), the kernel op's registered backward for
sparse ones (see ``attn_kernels/backward.py``). The op itself stays the inference path: one opaque node per
call in a compiled graph.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from contextvars import ContextVar

import torch

from ..attention.runtime import sdpa_dense

# (runtime, forward state) of the transformer forward running in this thread / task, or None.
ACTIVE: ContextVar = ContextVar("fastattn_active_forward", default=None)
# Calls that reached the backend with no enabled model running (e.g. the backend selected by hand).
ORPHAN_FALLBACKS: Counter = Counter()

BACKEND_NAME = "fastattn_sparse"
TESTED_DIFFUSERS = ((0, 42), (0, 43))  # [min, max) of major.minor
_BUILTIN_MODULE = "diffusers.models.attention_dispatch"


class UnsupportedDiffusersError(RuntimeError):
    pass


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_diffusers_version() -> str:
    import diffusers

    lo, hi = TESTED_DIFFUSERS
    ver = _version_tuple(diffusers.__version__)
    if not lo <= ver < hi:
        msg = (
            f"fastattn's diffusers backend is tested with diffusers >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}; "
            f"found {diffusers.__version__}. It uses diffusers' private attention dispatcher."
        )
        if os.environ.get("FASTATTN_ALLOW_UNTESTED_DIFFUSERS") != "1":
            raise UnsupportedDiffusersError(msg + " Set FASTATTN_ALLOW_UNTESTED_DIFFUSERS=1 to try anyway.")
        warnings.warn(msg, stacklevel=3)
    return diffusers.__version__


def _internals():
    from diffusers.models import attention_dispatch as ad

    names = ad.AttentionBackendName
    registry = getattr(ad, "_AttentionBackendRegistry", None)
    missing = [a for a in ("_member_map_", "_value2member_map_", "_member_names_") if not hasattr(names, a)]
    if registry is None:
        missing.append("_AttentionBackendRegistry")
    else:
        missing += [
            a
            for a in ("_backends", "_constraints", "_supported_arg_names", "register")
            if not hasattr(registry, a)
        ]
    if missing:
        raise UnsupportedDiffusersError(
            f"diffusers' attention dispatcher changed (missing {missing}); fastattn cannot register its backend"
        )
    return ad, names, registry


def fastattn_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
):
    """diffusers backend: ``[B, S, H, D]`` in and out. Calls the runtime op, or dense when it cannot help.

    Dropout, causal masks, GQA, LSE requests and context parallelism are outside what the runtime serves;
    they run diffusers' ``native`` math (counted as fallbacks of the running model).
    """
    unsupported = None
    if dropout_p:
        unsupported = "dropout_p > 0"
    elif is_causal:
        unsupported = "is_causal"
    elif enable_gqa or key.shape[2] != query.shape[2]:
        unsupported = "grouped-query attention"
    elif return_lse:
        unsupported = "return_lse (ring attention)"
    elif _parallel_config is not None:
        unsupported = "context parallelism"
    if unsupported is not None:
        _count_unsupported(unsupported, query, key)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        ).permute(0, 2, 1, 3)
        if return_lse:
            raise NotImplementedError(
                "fastattn_sparse: return_lse is not supported yet (no context parallelism)"
            )
        return out
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return _runtime_attend(query, key, value, attn_mask, scale)  # autograd sees the runtime's ops
    return runtime_attention(query, key, value, attn_mask, scale)


@torch.compiler.disable
def _count_unsupported(reason: str, query, key) -> None:
    active = ACTIVE.get()
    b, s, h, _ = query.shape
    if active is None:
        ORPHAN_FALLBACKS[reason] += 1
    else:
        active[0].stats.add_dense(reason, float(b * h * s * key.shape[1]), planned=False)


@torch.library.custom_op("fastattn::runtime_attention", mutates_args=())
def runtime_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Attention of the running fastattn forward on ``[B, S, H, D]`` tensors.

    A ``torch.library`` custom op, so a compiled graph holds one opaque node per call and nothing per
    layer (no recompiles per layer), and the runtime's Python decisions always run eagerly. Inference only:
    :func:`fastattn_attention` routes calls that need gradients around it.
    """
    return _runtime_attend(query, key, value, attn_mask, scale)


def _runtime_attend(query, key, value, attn_mask, scale) -> torch.Tensor:
    """The running forward's runtime (exact dense SDPA, counted, when none is running)."""
    active = ACTIVE.get()
    if active is None:
        ORPHAN_FALLBACKS["no enabled model is running"] += 1
        out = sdpa_dense(query, key, value, attn_mask, scale)
    else:
        runtime, state = active
        out = runtime.attend(state, query, key, value, attn_mask, scale)
    return out.contiguous()


@runtime_attention.register_fake
def _(query, key, value, attn_mask, scale):
    b, s, h, _ = query.shape
    return query.new_empty((b, s, h, value.shape[-1]))


def _no_gradient(ctx, inputs, output):
    # The op cannot replay the runtime's decisions (stats, caches, the layer counter) for a backward, so
    # gradients are served by running the runtime eagerly (fastattn_attention does that by itself).
    raise RuntimeError(
        "fastattn::runtime_attention is the inference path and records no gradient; for tensors that need "
        "one, call fastattn.pipelines.backend.fastattn_attention (the fastattn_sparse backend), which runs "
        "the runtime eagerly so autograd sees the attention it computed"
    )


runtime_attention.register_autograd(lambda ctx, grad: None, setup_context=_no_gradient)


def register_backend():
    """Add ``fastattn_sparse`` to diffusers' dispatcher (idempotent); returns the enum member."""
    check_diffusers_version()
    ad, names, registry = _internals()
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is not None:
        fn = registry._backends.get(member)
        if fn is not fastattn_attention and getattr(fn, "__module__", "") != __name__:
            raise UnsupportedDiffusersError(
                f"attention backend name {BACKEND_NAME!r} is already registered by {getattr(fn, '__module__', fn)}"
            )
        registry._backends[member] = fastattn_attention  # same module (e.g. reloaded): refresh
        return member
    _warn_if_builtins_replaced(ad, names, registry)
    member = str.__new__(names, BACKEND_NAME)
    member._name_ = BACKEND_NAME.upper()
    member._value_ = BACKEND_NAME
    # Set the class attribute before the member map knows the name: EnumType forbids reassigning members.
    type.__setattr__(names, member._name_, member)
    names._member_map_[member._name_] = member
    names._value2member_map_[BACKEND_NAME] = member
    names._member_names_.append(member._name_)
    registry.register(member, constraints=[], supports_context_parallel=False)(fastattn_attention)
    return member


def _warn_if_builtins_replaced(ad, names, registry) -> None:
    native = names._value2member_map_.get("native")
    fn = registry._backends.get(native)
    if fn is None or getattr(fn, "__module__", "") != _BUILTIN_MODULE:
        warnings.warn(
            "diffusers' built-in 'native' attention backend was replaced by "
            f"{getattr(fn, '__module__', fn)!r}; fastattn's dense path uses it as the reference",
            stacklevel=3,
        )


def dense_backend_fn(backend=None):
    """Exact dense attention ``(query, key, value, attn_mask, scale)`` through a diffusers backend.

    ``backend`` is what the processor had (``None``: the globally active backend, as diffusers resolves
    it). Our own backend resolves to ``native``.
    """
    _, names, registry = _internals()
    if backend is None:
        backend = registry._active_backend
    member = backend if isinstance(backend, names) else names(backend)
    if member.value == BACKEND_NAME:
        member = names("native")
    fn = registry._backends[member]
    accepted = registry._supported_arg_names[member]
    if member.value == "native":
        return sdpa_dense  # the same math as diffusers' native backend, without its checks

    def dense(query, key, value, attn_mask=None, scale=None):
        kwargs = {"query": query, "key": key, "value": value, "attn_mask": attn_mask, "scale": scale}
        return fn(**{k: v for k, v in kwargs.items() if k in accepted})

    return dense
