"""DeepSeek-V4 chat format: byte-exact encoder, completion parsers, streaming parser (standard library only).

See encoding/README.md for the contract, the lenient-parsing rules and every deviation from the reference.
"""

from .compat import normalize_messages, resolve_reasoning
from .encoder import MessageError, encode_messages, encode_segments, render_assistant
from .parser import (
    CompletionParseError,
    ContentDelta,
    Done,
    Event,
    ReasoningDelta,
    StreamParser,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    assemble,
    parse_completion,
    random_call_id,
)

__all__ = [
    "CompletionParseError", "ContentDelta", "Done", "Event", "MessageError", "ReasoningDelta", "StreamParser",
    "ToolCallDelta", "ToolCallEnd", "ToolCallStart", "assemble", "encode_messages", "encode_segments",
    "normalize_messages", "parse_completion", "random_call_id", "render_assistant", "resolve_reasoning",
]
