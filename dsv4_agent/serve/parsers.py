"""Our tool-call and reasoning parsers as SGLang detectors (registered by `plugin.register`).

SGLang runs the reasoning detector first and feeds its normal text to the tool-call detector. Both the
streaming and the one-shot path of the tool detector drive the same `dsv4_agent.encoding.StreamParser`
(chat mode: reasoning is already split off), so streamed deltas always assemble to the non-streamed result,
and the parser's guarantee -- no DSML byte or partial marker ever reaches a text delta -- carries over to
`content`.

Calls to tools the request does not declare are passed on (the client decides; SGLang's own detectors
drop them silently). With no tools at all (no tools declared, or `tool_choice="none"`, for which the chat
handler removes them), tool blocks are swallowed: the markup never reaches `content` and no call is made.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.function_call.base_format_detector import BaseFormatDetector
from sglang.srt.function_call.core_types import StreamingParseResult, StructureInfo, ToolCallItem
from sglang.srt.parser.reasoning_parser import BaseReasoningFormatDetector
from sglang.srt.parser.reasoning_parser import StreamingParseResult as ReasoningResult

from dsv4_agent.encoding import (
    ContentDelta,
    Event,
    ReasoningDelta,
    StreamParser,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from dsv4_agent.encoding.tokens import BOS, DSML, EOS, INVOKE_CLOSE, THINK_CLOSE, THINK_OPEN, TOOL_CALLS_OPEN
from dsv4_agent.serve.grammar import auto_tool_calls_tag, forced_tool_calls_tag

_MARKERS = ("DSML", BOS, EOS, THINK_OPEN, THINK_CLOSE)
_TAIL = 2 * len(BOS)  # longer than any marker cut at the end (a literal's head and two U+FFFD)


def _content(text: str) -> str:
    parser = StreamParser("chat")
    return "".join(ev.text for ev in parser.feed(text) + parser.finish() if isinstance(ev, ContentDelta))


class DSV4ToolDetector(BaseFormatDetector):
    """Streaming DSML tool-call detector over `dsv4_agent.encoding.StreamParser`."""

    def __init__(self) -> None:
        super().__init__()
        self.bot_token = TOOL_CALLS_OPEN
        self.eot_token = f"</{DSML}tool_calls>"
        self._parser = StreamParser("chat")

    @classmethod
    def parses_without_tools(cls) -> bool:
        # Keep the parser on with no tools declared, so stray markup is swallowed instead of shown.
        return True

    def has_tool_call(self, text: str) -> bool:
        # Anything the parser would change goes through it, so the one-shot path cleans text exactly as the
        # streaming path does: DSML with either pipe, EOS, stray BOS / think markers, and a marker cut at the
        # very end (`<｜DS`, or `<｜DSML` + U+FFFD when max_tokens stops inside a character). Without the
        # other markers only that end can change, and it lies in the tail.
        if any(marker in text for marker in _MARKERS):
            return True
        tail = text[-_TAIL:]
        return _content(tail) != tail

    @staticmethod
    def _convert(events: list[Event], tools: list[Any]) -> StreamingParseResult:
        text, calls = [], []
        for ev in events:
            if isinstance(ev, ContentDelta):
                text.append(ev.text)
            elif not tools:
                continue  # no tools: swallow the calls too
            elif isinstance(ev, ToolCallStart):
                calls.append(ToolCallItem(tool_index=ev.index, name=ev.name, parameters=""))
            elif isinstance(ev, ToolCallDelta):
                calls.append(ToolCallItem(tool_index=ev.index, parameters=ev.arguments))
        return StreamingParseResult(normal_text="".join(text), calls=calls)

    def parse_streaming_increment(self, new_text: str, tools: list[Any]) -> StreamingParseResult:
        return self._convert(self._parser.feed(new_text), tools)

    def finish(self, tools: list[Any]) -> StreamingParseResult:
        return self._convert(self._parser.finish(), tools)

    def detect_and_parse(self, text: str, tools: list[Any]) -> StreamingParseResult:
        parser = StreamParser("chat")
        events = parser.feed(text) + parser.finish()
        result = self._convert(events, tools)
        # One-shot results carry whole calls: merge each call's name and argument deltas.
        merged: dict[int, ToolCallItem] = {}
        for item in result.calls:
            if item.tool_index not in merged:
                merged[item.tool_index] = item.model_copy()
            else:
                merged[item.tool_index].parameters += item.parameters
        ended = {ev.index for ev in events if isinstance(ev, ToolCallEnd)}
        return StreamingParseResult(normal_text=result.normal_text,
                                    calls=[c for i, c in sorted(merged.items()) if i in ended])

    def structure_info(self) -> Any:
        def info(name: str) -> StructureInfo:
            return StructureInfo(begin=f'\n\n{TOOL_CALLS_OPEN}\n<{DSML}invoke name="{name}">\n',
                                 end=f"{INVOKE_CLOSE}\n</{DSML}tool_calls>", trigger=TOOL_CALLS_OPEN)

        return info

    def get_structural_tag(self, tools: list[Any] | None = None, tool_choice: Any = "auto",
                           thinking_mode: bool = False, parallel_tool_calls: bool = True) -> Any:
        """The grammar for forced calls (required / named), and for `auto` when SGLang asks for one (strict
        tools or SGLANG_TOOL_STRICT_LEVEL); plain `auto` stays unconstrained."""
        if not tools:
            return None
        if tool_choice == "auto":
            return auto_tool_calls_tag(tools, parallel_tool_calls)
        name = None if tool_choice == "required" else tool_choice.function.name
        return forced_tool_calls_tag(tools, name, parallel_tool_calls)


class DSV4ReasoningDetector(BaseReasoningFormatDetector):
    """`<think>`..`</think>` reasoning; the prompt already ends with `<think>` in thinking mode, so the
    completion starts inside reasoning exactly when the chat handler decided on thinking (same decision for
    the prompt and the parser, spec pitfall 6). A tool block that opens at a line start inside reasoning
    ends it (a model that forgot `</think>`): the block goes to the tool parser instead of reasoning.

    The reasoning text then goes through the encoding's parser (thinking mode), so the markup the tool parser
    never sees leaves it: a bare invoke or a block inside a line (swallowed: their calls are not made), stray
    tags, BOS/EOS, a marker cut at the end (`</thi`, `<｜DSML` + U+FFFD when max_tokens stops inside a
    character). Streamed and one-shot reasoning stay equal (the parser is chunking-invariant)."""

    def __init__(self, stream_reasoning: bool = True, force_reasoning: bool = False,
                 continue_final_message: bool = False, previous_content: str = "",
                 force_nonempty_content: bool = False) -> None:
        super().__init__(THINK_OPEN, THINK_CLOSE, think_excluded_tokens=[EOS, DSML],
                         force_reasoning=force_reasoning, stream_reasoning=stream_reasoning,
                         tool_start_token=TOOL_CALLS_OPEN, tool_start_at_line_start=True,
                         continue_final_message=continue_final_message, previous_content=previous_content,
                         thinks_internally=True, reasoning_default="thinking",
                         force_nonempty_content=force_nonempty_content)
        self._cleaner = StreamParser("thinking")

    def _clean(self, text: str, final: bool) -> str:
        """Reasoning through the cleaner; `final` when the reasoning ends (its held-back end is decided)."""
        events = self._cleaner.feed(text) if text else []
        if final:
            events += self._cleaner.finish()
            self._cleaner = StreamParser("thinking")
        return "".join(ev.text for ev in events if isinstance(ev, ReasoningDelta))

    def _detect_and_parse_impl(self, text: str) -> ReasoningResult:
        # As when streaming, a tool block at a line start ends the reasoning also when a `</think>` follows it
        # (the base looks for one only when there is no `</think>`, and the cleaner would swallow the block).
        tool = self._find_tool_start(text) if self._in_reasoning or THINK_OPEN in text else -1
        end = text.find(THINK_CLOSE)
        if tool != -1 and -1 < end and tool < end and THINK_CLOSE not in self.previous_content:
            result = super()._detect_and_parse_impl(text[:tool])
            result.normal_text += text[tool:]
        else:
            result = super()._detect_and_parse_impl(text)
        result.reasoning_text = self._clean(result.reasoning_text, final=True)
        return result

    def _parse_streaming_increment_impl(self, new_text: str) -> ReasoningResult:
        was_reasoning = self._in_reasoning
        result = super()._parse_streaming_increment_impl(new_text)
        if result.reasoning_text or (was_reasoning and not self._in_reasoning):
            result.reasoning_text = self._clean(result.reasoning_text, final=not self._in_reasoning)
        return result

    def finish(self) -> ReasoningResult:
        if self._in_reasoning:  # the held-back end of the reasoning: cleaned before the base flushes it
            self._buffer = self._clean(self._buffer, final=True)
        return super().finish()

    def _strip_partial_tool_start(self, text: str, preceded_by: str = "") -> str:
        return text  # the cleaner drops a cut marker of two or more characters anywhere; a lone `<` is text
