"""The MagicMix engine: the only package that imports torch, diffusers and transformers.

It knows nothing of HTTP, jobs or storage: `MixRequest`s in, images out.
"""

from magicmix.engine.pipeline import EngineOptions, MagicMixEngine, MixResult, mix_latents

__all__ = ["EngineOptions", "MagicMixEngine", "MixResult", "mix_latents"]
