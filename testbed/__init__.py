"""fastattn's testbed: a small learned video DiT that we own, its data, training, sampler and metrics.

Random-weight DiTs attend almost uniformly, so they cannot tell how much quality a sparse, quantized or
cached attention loses. This sub-package trains (``python -m fastattn.testbed.train``) and ships a small
class-conditional video DiT whose attention is learned, for *relative* comparisons (fast vs dense on the
same model). It is not, and is never presented as, FLUX or Wan quality.
"""

from .model import AttentionCall, TestbedConfig, TestbedDiT, sdpa_attention

__all__ = ["AttentionCall", "TestbedConfig", "TestbedDiT", "sdpa_attention"]
