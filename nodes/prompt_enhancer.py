"""ComfyUI "Prompt Enhancer" node: rewrite a prompt with a local causal LM on the quantized KV cache.

V1 node style (``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION``); importing this module does not import
ComfyUI, so it can be tested standalone.
"""

from __future__ import annotations


class FastAttnPromptEnhancer:
    """Rewrites ``prompt`` with the causal LM at ``model_path`` (a transformers directory, a directory with a
    ``.gguf``, or a ``.gguf`` file) using a ``kv_bits``-bit quantized KV cache; outputs the new prompt."""

    CATEGORY = "fastattn"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "enhance"

    @classmethod
    def INPUT_TYPES(cls):
        from ..prompt import DEFAULT_INSTRUCTION

        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": ""}),
                "model_path": ("STRING", {"default": ""}),
                "max_new_tokens": ("INT", {"default": 120, "min": 1, "max": 2048}),
                "kv_bits": (["4", "8", "2"],),
            },
            "optional": {
                "instruction": ("STRING", {"multiline": True, "default": DEFAULT_INSTRUCTION}),
            },
        }

    def enhance(self, prompt, model_path, max_new_tokens=120, kv_bits="4", instruction=None):
        from ..prompt import DEFAULT_INSTRUCTION, enhance

        if not str(model_path).strip():
            raise ValueError("model_path is empty: point it at a local causal LM (directory or .gguf file)")
        text = enhance(
            prompt,
            model=model_path,
            instruction=instruction or DEFAULT_INSTRUCTION,
            max_new_tokens=int(max_new_tokens),
            bits=int(kv_bits),
        )
        return (text,)


NODE_CLASS_MAPPINGS = {"FastAttnPromptEnhancer": FastAttnPromptEnhancer}
NODE_DISPLAY_NAME_MAPPINGS = {"FastAttnPromptEnhancer": "Prompt Enhancer (fastattn, quantized KV)"}
