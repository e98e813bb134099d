"""ComfyUI nodes of the fastattn pack (V3 schema).

ComfyUI loads the pack through :func:`comfy_entrypoint` (the package root exports it and no
``NODE_CLASS_MAPPINGS``: ComfyUI's loader prefers V1 mappings when both exist). ``comfy_api`` exists only
inside ComfyUI, so it is imported here lazily; importing this package imports neither ComfyUI nor anything
heavy. The node logic lives in plain modules (``fast_attention``, ``prompt_enhancer``, ``host/``) that are
tested without ComfyUI; ``comfy_nodes`` holds the thin V3 classes.
"""


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing the pack's nodes."""
    from .comfy_nodes import FastAttnExtension

    return FastAttnExtension()


__all__ = ["comfy_entrypoint"]
