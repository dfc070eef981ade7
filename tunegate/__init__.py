"""tunegate: reproducible, gated fine-tuning of open-weight LLMs."""

__version__ = "0.1.0"
