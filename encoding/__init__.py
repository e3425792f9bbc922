"""DeepSeek-V4 chat format: byte-exact encoder, completion parsers, streaming parser (standard library only)."""

from .encoder import MessageError, encode_messages, encode_segments, render_assistant

__all__ = ["MessageError", "encode_messages", "encode_segments", "render_assistant"]
