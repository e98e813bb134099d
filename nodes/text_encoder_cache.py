"""The "Fast Attention Text Encoder Cache" node's logic (CLIP -> CLIP, STRING), testable without ComfyUI.

:func:`apply_text_encoder_cache` finds the text encoders in a CLIP's ``cond_stage_model`` (ComfyUI's
``SDClipModel``-like modules: one ``transformer`` each), the template prefix its tokenizer puts in front of every
prompt (the longest run of leading tokens ``clip.tokenize`` gives for a few different prompts), and on a
``clip.clone()`` installs a :class:`~fastattn.nodes.host.llm_prefix.PrefixCachedForward` as an object patch of
each decoder LM's core (``add_object_patch``). The input CLIP is never changed; bypassing or deleting the node
gives it back as it was.

Before returning, the node checks and measures the clone on a probe prompt, one run each: the encoder without the
cache (the reference and its time), with the prefix kept unquantized (must equal the reference up to float
rounding, else the node passes through: a ComfyUI whose encoder works differently), and with the quantized
prefix (its time and its error against the reference). The report says what was cached, the K/V memory against
bf16, the time saved per prompt, the error, and for every encoder left alone, why.
"""

from __future__ import annotations

import logging
import numbers
import time
import types

import torch

from .fast_attention import NodeError
from .host.llm_prefix import PrefixCachedForward, decoder_reason, is_decoder_core

log = logging.getLogger("fastattn")

BITS = ("8", "4", "2", "off")
# Prompts tokenized to find the template's fixed leading tokens (different first words, so no BPE merge across
# the placeholder is taken for template).
PROBES = ("a cat", "Zebra 123 on a bright beach", ".", "\u00e9t\u00e9 \u00e0 Paris")
PROBE_PROMPT = "a red fox trotting through fresh snow at sunrise, soft golden light, cinematic wide shot"
MIN_PREFIX_TOKENS = 8  # fewer fixed tokens than this is not a template worth caching (a BOS token, say)
# The unquantized prefix must reproduce the encoder up to float rounding (relative L2); a semantic mismatch (wrong
# positions, masks or layers) is far above this on a real model.
EXACT_TOLERANCE = 1e-2


def check_bits(bits) -> str:
    bits = str(bits)
    if bits not in BITS:
        raise NodeError(f"bits must be one of {list(BITS)}, got {bits!r}")
    return bits


# ------------------------------------------------------------------------------------------ what is in a CLIP


class Encoder:
    """One text encoder of a CLIP: its module path, class, decoder core path and why it cannot be cached."""

    def __init__(self, name: str, kind: str, core=None, reason: str | None = None):
        self.name, self.kind, self.core, self.reason = name, kind, core, reason
        self.core_path = f"{name}.transformer.model" if name else "transformer.model"
        self.prefix: list[int] | None = None
        self.adapter: PrefixCachedForward | None = None

    @property
    def label(self) -> str:
        return f"{self.name or 'text encoder'} ({self.kind})"


def find_encoders(cond_stage_model) -> list[Encoder]:
    """Every text encoder in ``cond_stage_model`` (modules with a ``transformer`` and ``encode_token_weights``),
    with ``reason`` set for those the cache cannot take."""
    found = []
    for name, module in cond_stage_model.named_modules():
        transformer = getattr(module, "transformer", None)
        if not isinstance(transformer, torch.nn.Module) or not callable(
            getattr(module, "encode_token_weights", None)
        ):
            continue
        core = getattr(transformer, "model", None)
        kind = type(transformer).__name__
        if core is None or not is_decoder_core(core):
            found.append(Encoder(name, kind, reason="not a decoder LM: only ComfyUI's llama.py decoders (Llama, "
                                                    "Qwen 2.5, Gemma 2, ...) run a prompt template causally"))  # fmt: skip
            continue
        found.append(Encoder(name, kind, core, decoder_reason(core)))
    return found


def _leading_ids(section) -> list[int]:
    """The integer token ids of one tokenized section up to its first embedding (image, textual inversion)."""
    out = []
    for item in section:
        token = item[0]
        if not isinstance(token, numbers.Integral):
            break
        out.append(int(token))
    return out


def template_prefixes(clip) -> dict[str, list[int]]:
    """For each tokenizer output of ``clip`` (``"l"``, ``"llama"``, ``"qwen25_7b"``, ...), the token ids every
    prompt starts with: the longest common prefix of :data:`PROBES` tokenized by ``clip.tokenize``."""
    rows = [clip.tokenize(p) for p in PROBES]
    out = {}
    for key in rows[0]:
        seqs = [_leading_ids(r[key][0]) if r.get(key) else [] for r in rows]
        n = 0
        while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
            n += 1
        out[key] = seqs[0][:n]
    return out


def _pair(encoders: list[Encoder], prefixes: dict[str, list[int]]) -> None:
    """Give each decoder its tokenizer output's prefix: the output named like the encoder (``llama`` ->
    ``llama``, ``clip_l`` -> ``l``), or the only output when there is one encoder and one output."""
    decoders = [e for e in encoders if e.reason is None]
    for e in decoders:
        top = e.name.split(".")[0]
        keys = [k for k in prefixes if top in (k, f"clip_{k}")]
        if not keys and len(decoders) == 1 and len(prefixes) == 1:
            keys = list(prefixes)
        if not keys:
            e.reason = f"no tokenizer output feeds it (outputs: {sorted(prefixes)})"
            continue
        ids = prefixes[keys[0]]
        if len(ids) < MIN_PREFIX_TOKENS:
            e.reason = (f"its tokenizer puts only {len(ids)} fixed token(s) before the prompt: no template to "
                        f"cache (at least {MIN_PREFIX_TOKENS} needed)")  # fmt: skip
            continue
        e.prefix = ids


# ------------------------------------------------------------------------------------------ apply


def apply_text_encoder_cache(clip, bits: str = "8", probe: str = PROBE_PROMPT):
    """``(clip, report)``: a ``clone()`` of ``clip`` whose decoder-LM text encoders reuse the template prefix's
    quantized K/V, or ``clip`` itself (unchanged) with the report saying why not."""
    bits = check_bits(bits)
    if bits == "off":
        return clip, "fastattn text-encoder cache: off (the CLIP passes through unchanged)"
    try:
        from ..kvcache.frozen_prefix import FrozenPrefixKV
    except ImportError as e:  # fastattn.kvcache pulls in transformers' cache classes
        return clip, _passthrough([], f"fastattn's KV-cache quantizers could not be imported ({e})")
    encoders = find_encoders(clip.cond_stage_model)
    if not encoders:
        return clip, _passthrough(encoders, "no text encoder found in this CLIP")
    if any(e.reason is None for e in encoders):
        try:
            prefixes = template_prefixes(clip)
        except Exception as err:  # a tokenizer that needs more than text (nothing is patched yet)
            return clip, _passthrough(encoders, f"the CLIP's tokenizer failed on a probe prompt "
                                                f"({type(err).__name__}: {err})")  # fmt: skip
        _pair(encoders, prefixes)
    takers = [e for e in encoders if e.reason is None]
    if not takers:
        return clip, _passthrough(encoders, "no text encoder here can take it")
    patched = clip.clone()
    for e in takers:
        key = f"{e.core_path}.forward"
        previous = patched.patcher.object_patches.get(key)
        if isinstance(previous, PrefixCachedForward):  # a cache node upstream: replace it, do not stack
            previous = previous.previous
        e.adapter = PrefixCachedForward(e.core, e.prefix, int(bits), FrozenPrefixKV, previous=previous)
        patched.patcher.add_object_patch(key, e.adapter)
    try:
        probed = _probe(patched, takers, probe)
    except Exception as err:  # the clone is dropped: the caller's CLIP was never changed
        log.exception("fastattn text-encoder cache: the probe encode failed; passing the CLIP through")
        _unset(patched, takers)
        return clip, _passthrough(encoders, f"the probe encode failed ({type(err).__name__}: {err})")
    if probed["exact_error"] > EXACT_TOLERANCE:
        _unset(patched, takers)
        return clip, _passthrough(encoders, (
            f"with the prefix unquantized the encoder's output moved by {probed['exact_error']:.2e} (relative L2, "
            f"more than float rounding's {EXACT_TOLERANCE:g}): this ComfyUI's text encoder works in a way the cache "
            "does not reproduce"))  # fmt: skip
    report = _report(encoders, int(bits), probed)
    for e in takers:
        e.adapter.summary = report
    return patched, report


def _unset(patched, takers: list[Encoder]) -> None:
    """Put back what the probe's load of the (now dropped) clone set on the shared model, as the patcher does when
    another clone loads; a class's own bound ``forward`` is removed rather than pinned on the instance."""
    backup = getattr(patched.patcher, "object_patches_backup", {})
    for e in takers:
        key = f"{e.core_path}.forward"
        if key not in backup:
            continue
        old = backup.pop(key)
        if (
            isinstance(old, types.MethodType)
            and old.__self__ is e.core
            and old.__func__ is type(e.core).forward
        ):
            e.core.__dict__.pop("forward", None)
        else:
            e.core.forward = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _probe(patched, takers: list[Encoder], prompt: str) -> dict:
    """Encode ``prompt`` on the patched clone in each mode (see the module docstring); times and errors."""
    adapters = [e.adapter for e in takers]
    tokens = patched.tokenize(prompt)
    patched.load_model()
    # where the encoder computes (its weights may sit elsewhere under ComfyUI's low-VRAM loading)
    device = torch.device(
        getattr(patched.patcher, "load_device", None) or next(takers[0].core.parameters()).device
    )

    def encode(mode: str):
        for a in adapters:
            a.mode = mode
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = patched.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, (time.perf_counter() - start) * 1000

    try:
        exact, _ = encode("exact")  # also the warm-up
        ref, ms_off = encode("off")
        encode("cache")  # builds the quantized prefix
        cached, ms_cache = encode("cache")
    finally:
        for a in adapters:
            a.mode = "cache"
            a.drop("exact")
    for name in ref:
        r, c = ref[name], cached[name]
        if isinstance(r, torch.Tensor) and (not isinstance(c, torch.Tensor) or r.shape != c.shape
                                            or r.dtype != c.dtype):  # fmt: skip
            raise RuntimeError(f"the cached encode's {name!r} has another layout: "
                               f"{getattr(c, 'shape', c)} vs {tuple(r.shape)}")  # fmt: skip
    probed = {
        "ms_off": ms_off,
        "ms_cache": ms_cache,
        "exact_error": _rel(exact["cond"], ref["cond"]),
        "error": _rel(cached["cond"], ref["cond"]),
        "device": device.type,
        "tokens": {e.name: len(_leading_ids(tokens[_token_key(tokens, e)][0])) for e in takers},
        "memory": {e.name: e.adapter.memory() for e in takers},
    }
    for a in adapters:
        a.reset_stats()
    return probed


def _token_key(tokens: dict, e: Encoder) -> str:
    top = e.name.split(".")[0]
    return next((k for k in tokens if top in (k, f"clip_{k}")), next(iter(tokens)))


# ------------------------------------------------------------------------------------------ reports


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _passthrough(encoders: list[Encoder], why: str) -> str:
    lines = [f"fastattn text-encoder cache: not applied, the CLIP passes through unchanged: {why}"]
    lines += [f"  {e.label}: {e.reason}" for e in encoders if e.reason]
    return "\n".join(lines)


def _report(encoders: list[Encoder], bits: int, probed: dict) -> str:
    lines = [f"fastattn text-encoder cache: template prefix K/V at {bits} bits"]
    for e in encoders:
        if e.reason:
            lines.append(f"  {e.label}: left as is: {e.reason}")
            continue
        mem = probed["memory"][e.name]
        share = mem["total_bytes"] / mem["bf16_bytes"] if mem["bf16_bytes"] else 0.0
        lines.append(f"  {e.label}: {len(e.prefix)} template tokens cached ({mem['layers']} layers); their K/V "
                     f"take {_mb(mem['total_bytes'])} at {bits} bits vs {_mb(mem['bf16_bytes'])} in bf16 "
                     f"({share:.0%})")  # fmt: skip
        total = probed["tokens"][e.name]
        lines.append(f"    probe prompt: {total} tokens, {total - len(e.prefix)} after the template")
    saved = probed["ms_off"] - probed["ms_cache"]
    share = saved / probed["ms_off"] if probed["ms_off"] > 0 else 0.0
    lines.append(f"  text encode per prompt: {probed['ms_off']:.1f} ms without the cache, {probed['ms_cache']:.1f} "
                 f"ms with it: {saved:.1f} ms saved ({share:.0%}; one run each on {probed['device']})")  # fmt: skip
    lines.append(f"  conditioning vs the encoder without the cache: relative L2 error {probed['error']:.2e} at "
                 f"{bits} bits ({probed['exact_error']:.1e} with the prefix unquantized)")  # fmt: skip
    return "\n".join(lines)


def find_caches(clip) -> list[PrefixCachedForward]:
    """The prefix caches installed on ``clip`` (a CLIP from this node, or a clone of one)."""
    patcher = getattr(clip, "patcher", None)
    patches = getattr(patcher, "object_patches", {}) or {}
    return [p for p in patches.values() if isinstance(p, PrefixCachedForward)]


def report_text(clip) -> str:
    """The apply-time report plus what the caches did since: rows encoded from the cache, rows that ran the
    encoder's own forward and why, prefix rebuilds."""
    caches = find_caches(clip)
    if not caches:
        return "fastattn text-encoder cache is not applied to this CLIP"
    lines = [caches[0].summary] if caches[0].summary else []
    for c in caches:
        s = c.stats
        line = (f"  since then: {s['rows_cached']} prompt row(s) from the cache ({s['tokens_skipped']} template "
                f"tokens not recomputed), {s['rows_missed']} on the encoder's own forward")  # fmt: skip
        if s["miss_reasons"]:
            line += ": " + "; ".join(f"{k} x{v}" for k, v in sorted(s["miss_reasons"].items()))
        if s["builds"]:
            line += f"; prefix rebuilt {s['builds']} time(s) (weights, device or layer choice changed)"
        lines.append(line)
    return "\n".join(lines)
