"""dsv4-agent: an SGLang-based agent serving runtime for DeepSeek-V4."""

__version__ = "0.1.0"
