"""ComfyUI nodes of the fastattn pack. Each module's node classes are collected here; importing this package
imports neither ComfyUI nor anything heavy (the nodes load their dependencies when they run)."""

from .prompt_enhancer import NODE_CLASS_MAPPINGS as _PROMPT_NODES
from .prompt_enhancer import NODE_DISPLAY_NAME_MAPPINGS as _PROMPT_NAMES

NODE_CLASS_MAPPINGS: dict = {**_PROMPT_NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict = {**_PROMPT_NAMES}
