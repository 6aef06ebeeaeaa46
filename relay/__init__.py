"""mj-relay: an OpenAI-compatible relay for Midjourney-proxy providers."""

__version__ = "0.1.0"
