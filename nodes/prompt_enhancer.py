"""The "Prompt Enhancer" node's logic: rewrite a prompt with a local causal LM on the quantized KV cache.

Plain functions (no ComfyUI import, testable standalone); the V3 node class is in ``comfy_nodes.py``.

The LM stays loaded between runs (one at a time, see :func:`fastattn.prompt.load_causal_lm`) unless the node's
``keep_loaded`` is off. Inside ComfyUI it is also freed whenever ComfyUI unloads its own models:
``comfy.model_management.unload_all_models()``, which the "Unload Models" / "Free model and node cache" buttons
(``POST /free``), an out-of-memory error and ``--disable-smart-memory`` (after every prompt) call.
"""

from __future__ import annotations

import logging
import sys

KV_BITS = ("4", "8", "2")
_HOOK_MARK = "_fastattn_frees_prompt_lms"


def check_kv_bits(kv_bits) -> str | None:
    """Why ``kv_bits`` is not a choice of the node (None when it is)."""
    if str(kv_bits) not in KV_BITS:
        return f"kv_bits must be one of {list(KV_BITS)}, got {kv_bits!r}"
    return None


def free_with_host_models() -> bool:
    """Free the enhancer's kept LMs when ComfyUI unloads its models (see the module docstring).

    Stacks a wrapper on ``comfy.model_management.unload_all_models`` that runs whatever was there, then frees
    ours, then puts the function back as it was (the next run that keeps a model installs it again). Only where
    ComfyUI is already imported; returns whether the wrapper is in place."""
    mm = sys.modules.get("comfy.model_management")
    current = getattr(mm, "unload_all_models", None)
    if current is None:
        return False
    if getattr(current, _HOOK_MARK, False):
        return True

    def unload_all_models(*args, **kwargs):
        from ..prompt import unload_causal_lm

        try:
            return current(*args, **kwargs)
        finally:
            freed = unload_causal_lm()
            if freed:
                logging.getLogger(__name__).info(
                    "fastattn Prompt Enhancer: freed %d kept LM(s) with ComfyUI's models", freed
                )
            if mm.unload_all_models is unload_all_models:  # nobody stacked on top of us since: restore
                mm.unload_all_models = current

    setattr(unload_all_models, _HOOK_MARK, True)
    unload_all_models.__wrapped__ = current
    mm.unload_all_models = unload_all_models
    return True


def enhance_prompt(prompt: str, model_path: str, max_new_tokens: int = 120, kv_bits: str = "4",
                   instruction: str | None = None, keep_loaded: bool = True) -> str:  # fmt: skip
    """Rewrite ``prompt`` with the causal LM at ``model_path`` (a transformers directory, a directory with a
    ``.gguf``, or a ``.gguf`` file) using a ``kv_bits``-bit quantized KV cache; returns the new prompt.
    ``keep_loaded=False`` frees the LM after the rewrite (the next run loads it again)."""
    from ..prompt import DEFAULT_INSTRUCTION, enhance, unload_causal_lm

    if not str(model_path).strip():
        raise ValueError("model_path is empty: point it at a local causal LM (directory or .gguf file)")
    bad = check_kv_bits(kv_bits)
    if bad is not None:
        raise ValueError(bad)
    try:
        return enhance(
            prompt,
            model=model_path,
            instruction=instruction or DEFAULT_INSTRUCTION,
            max_new_tokens=int(max_new_tokens),
            bits=int(kv_bits),
        )
    finally:
        if keep_loaded:
            free_with_host_models()
        else:
            unload_causal_lm(model_path)
