"""The "Prompt Enhancer" node's logic: rewrite a prompt with a local causal LM on the quantized KV cache.

Plain functions (no ComfyUI import, testable standalone); the V3 node class is in ``comfy_nodes.py``.

Inside ComfyUI the LM is one of ComfyUI's models. It is wrapped in a ``comfy.model_patcher.ModelPatcher`` that
loads it on ComfyUI's device and offloads it to ComfyUI's text-encoder offload device, and it is loaded with
``comfy.model_management.load_models_gpu`` before each rewrite. So ComfyUI counts its memory, moves it off the
GPU when another model needs the room, and unloads it with its own models: "Unload Models" / "Free model and
node cache" (``POST /free``), an out-of-memory error and ``--disable-smart-memory`` (after every prompt) all call
``unload_all_models()``. When ComfyUI unloads the LM, the node lets go of it, and the next run reads it again.
Between runs the node keeps one LM. With ``keep_loaded`` off it lets go of the LM after each rewrite.

Outside ComfyUI (where the ``comfy`` modules are not imported) the node keeps the LM in
:func:`fastattn.prompt.load_causal_lm`'s cache, as plain Python use does.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import torch

KV_BITS = ("4", "8", "2")
_CALLBACK_KEY = "fastattn_prompt_enhancer"
# Inside ComfyUI: model path -> the ModelPatcher of the LM kept for the next run (at most one).
_KEPT: dict[str, object] = {}

log = logging.getLogger(__name__)


class PromptEnhancerLM(torch.nn.Module):
    """The module a ComfyUI ModelPatcher holds: the causal LM (``lm``) and its tokenizer.

    The patcher writes its device and memory counters as attributes of the module it holds. This wrapper takes
    them, so they are not written on the transformers model, whose ``device`` is a read-only property."""

    def __init__(self, lm: torch.nn.Module, tokenizer, path: str):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.path = path
        self.device = lm.device

    def release(self) -> bool:
        """Drop the LM and its tokenizer. The module stays, empty. Returns whether it held them."""
        held = self.lm is not None
        self.lm, self.tokenizer = None, None
        return held


def check_kv_bits(kv_bits) -> str | None:
    """Why ``kv_bits`` is not a choice of the node (None when it is)."""
    if str(kv_bits) not in KV_BITS:
        return f"kv_bits must be one of {list(KV_BITS)}, got {kv_bits!r}"
    return None


def _comfy():
    """``(model_management, model_patcher, patcher_extension)`` of the ComfyUI running this process, else None.

    Taken from ``sys.modules`` because this module imports nothing of ComfyUI. ComfyUI imports all three at
    startup."""
    names = ("comfy.model_management", "comfy.model_patcher", "comfy.patcher_extension")
    modules = tuple(sys.modules.get(name) for name in names)
    return None if any(m is None for m in modules) else modules


def _release_on_detach(patcher, unpatch_all: bool) -> None:
    """ComfyUI's ON_DETACH callback: ComfyUI took the LM off its device (one of its unloads, or a failed load).
    Let go of the weights now.

    The patcher and its emptied module stay in ``_KEPT`` until the next run. Dropping the patcher here would
    collect it inside ComfyUI's unload, and ComfyUI's clean-up of collected models would then edit its list of
    loaded models while the unload is walking that list. ``unpatch_all`` is False only on detaches that keep
    the weights where they are (a patcher being collected)."""
    if unpatch_all and patcher.model.release():
        log.info("fastattn Prompt Enhancer: ComfyUI unloaded the LM (%s); freed it", patcher.model.path)


def _forget(comfy, path: str | None = None) -> int:
    """Let go of the kept LM of ``path`` (all of them when None). Returns how many there were.

    Each patcher is collected here, outside ComfyUI's own loops, and ComfyUI then drops it from its loaded
    models."""
    keys = [k for k in _KEPT if path is None or k == path]
    for k in keys:
        _KEPT.pop(k).model.release()
    if keys:
        gc.collect()  # transformers models can hold reference cycles
        comfy[0].soft_empty_cache()
    return len(keys)


def lm_dtype(device) -> torch.dtype:
    """The LM's dtype on ``device``: bf16 on a GPU that has it (else fp16), half of float32's memory; float32 on
    the CPU, where half-precision matrix products are slow."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _load_in_comfyui(comfy, path: str):
    """The ModelPatcher of the LM at ``path``, loaded on ComfyUI's device through ComfyUI's memory management."""
    from ..prompt import read_causal_lm

    mm, model_patcher, patcher_extension = comfy
    patcher = _KEPT.get(path)
    if patcher is None or patcher.model.lm is None:  # not kept, or ComfyUI has unloaded it since
        patcher = None  # an emptied patcher left from ComfyUI's unload goes too
        _forget(comfy)  # one LM at a time: the old one goes before the new one is read
        device = mm.get_torch_device()
        lm, tokenizer = read_causal_lm(path, dtype=lm_dtype(device))
        patcher = model_patcher.ModelPatcher(
            PromptEnhancerLM(lm, tokenizer, path),
            load_device=device,
            offload_device=mm.text_encoder_offload_device(),
        )
        patcher.add_callback_with_key(
            patcher_extension.CallbacksMP.ON_DETACH, _CALLBACK_KEY, _release_on_detach
        )
        _KEPT[path] = patcher
    # Loaded whole. The LM's layers are plain torch layers, which cannot run with part of their weights left on
    # the offload device (ComfyUI's partial loading needs its own weight-casting layers).
    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher


def _enhance_in_comfyui(comfy, path: str, prompt: str, **kwargs) -> str:
    from ..prompt import enhance

    hosted = _load_in_comfyui(comfy, path).model
    return enhance(prompt, model=hosted.lm, tokenizer=hosted.tokenizer, **kwargs)


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
    kwargs = dict(
        instruction=instruction or DEFAULT_INSTRUCTION, max_new_tokens=int(max_new_tokens), bits=int(kv_bits)
    )
    path = os.path.abspath(os.path.expanduser(str(model_path)))
    comfy = _comfy()
    try:
        if comfy is None:
            return enhance(prompt, model=path, **kwargs)
        return _enhance_in_comfyui(comfy, path, prompt, **kwargs)
    finally:
        if not keep_loaded:
            if comfy is None:
                unload_causal_lm(path)
            else:
                _forget(comfy, path)
