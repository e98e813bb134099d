"""The "Prompt Enhancer" node's logic: rewrite a prompt with a local causal LM on the quantized KV cache.

Plain functions (no ComfyUI import, testable standalone); the V3 node class is in ``comfy_nodes.py``.
"""

from __future__ import annotations

KV_BITS = ("4", "8", "2")


def check_kv_bits(kv_bits) -> str | None:
    """Why ``kv_bits`` is not a choice of the node (None when it is)."""
    if str(kv_bits) not in KV_BITS:
        return f"kv_bits must be one of {list(KV_BITS)}, got {kv_bits!r}"
    return None


def enhance_prompt(prompt: str, model_path: str, max_new_tokens: int = 120, kv_bits: str = "4",
                   instruction: str | None = None) -> str:  # fmt: skip
    """Rewrite ``prompt`` with the causal LM at ``model_path`` (a transformers directory, a directory with a
    ``.gguf``, or a ``.gguf`` file) using a ``kv_bits``-bit quantized KV cache; returns the new prompt."""
    from ..prompt import DEFAULT_INSTRUCTION, enhance

    if not str(model_path).strip():
        raise ValueError("model_path is empty: point it at a local causal LM (directory or .gguf file)")
    bad = check_kv_bits(kv_bits)
    if bad is not None:
        raise ValueError(bad)
    return enhance(
        prompt,
        model=model_path,
        instruction=instruction or DEFAULT_INSTRUCTION,
        max_new_tokens=int(max_new_tokens),
        bits=int(kv_bits),
    )
