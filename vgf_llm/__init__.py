"""vgf_llm: reinforcement learning and test-time scaling for language models with Value Gradient Flow."""

from vgf_llm.flow import TransportTrace, svgd_direction, transport

__version__ = "0.1.0"
__all__ = ["TransportTrace", "svgd_direction", "transport", "__version__"]
