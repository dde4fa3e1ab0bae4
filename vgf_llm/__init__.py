"""vgf_llm: reinforcement learning and test-time scaling for language models with Value Gradient Flow."""

from vgf_llm.flow import TransportTrace, svgd_direction, transport

__version__ = "0.1.0"
__all__ = ["SamplerConfig", "TransportTrace", "VGFConfig", "VGFSampler", "VGFTrainer", "svgd_direction", "transport",
           "__version__"]

_LAZY = {"VGFConfig": "vgf_llm.config", "VGFTrainer": "vgf_llm.trainer", "VGFSampler": "vgf_llm.sampler",
         "SamplerConfig": "vgf_llm.sampler"}


def __getattr__(name: str):
    """The LLM classes import transformers; load them on first use so the transport core stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vgf_llm' has no attribute {name!r}")
