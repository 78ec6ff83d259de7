"""forged: a local LLM appliance daemon for NVIDIA edge boxes."""

__version__ = "0.1.0"
