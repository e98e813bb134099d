"""fastattn: fast sparse, reordered and quantized attention for diffusion transformers.

The repository root is this package. ComfyUI imports it as a custom-node pack and reads
``NODE_CLASS_MAPPINGS``; Python users ``import fastattn``. Importing it stays light: no ComfyUI,
no GPU, no diffusers until a feature that needs them is used.
"""

__version__ = "0.1.0"

from .masks import BlockMask, TokenLayout  # noqa: E402  (light: torch only)

__all__ = ["BlockMask", "TokenLayout", "__version__"]

# ComfyUI discovers nodes through these names; they are filled by the node pack when it exists.
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
