"""SGLang general plugin (entry point group `sglang.srt.plugins`, name `dsv4_agent`).

SGLang calls `register()` early in every process it starts (launcher, tokenizer manager, scheduler,
detokenizer), then applies the registered hooks. What is registered, and through which extension point:

* tool-call parser `dsv4_agent` -> `FunctionCallParser.ToolCallParserEnum` (the registry dict that
  `--tool-call-parser` choices are read from; there is no register API);
* reasoning parser `dsv4_agent` -> `ReasoningParser.DetectorMap` (same, for `--reasoning-parser`; the
  scheduler's grammar backend uses it to find the end of reasoning before applying a tool grammar);
* chat encoding spec `dsv4_agent` -> `chat_encoding_adapters._BUILDERS` (the adapter registry the chat
  handler builds its encoder from);
* the chat handler -> a class REPLACE hook on `OpenAIServingChat` via `HookRegistry`. A subclass is the
  documented way to choose the encoding spec (`_resolve_chat_encoding_spec`: "Override in subclass") and
  the only place that sees the whole request and response, which the reasoning switches, the
  tool_call_id reasoning store, the `reasoning` output field and the field-naming 400s need;
* the KV pool, pool sizing and radix cache of our model: `dsv4_agent.serve.v4cache.register()`.

Registration is skipped when the server was not started for our model (no `DSV4_AGENT_SERVE=1` in the
environment, set by `dsv4-agent serve`): installing dsv4-agent must not change other SGLang deployments.
"""

from __future__ import annotations

import os
import sys

from dsv4_agent.serve import ENCODING_SPEC, REASONING_PARSER, TOOL_PARSER

ENABLE_ENV = "DSV4_AGENT_SERVE"


def register() -> None:
    if os.environ.get(ENABLE_ENV) != "1":
        return
    from sglang.srt.entrypoints.openai import chat_encoding_adapters
    from sglang.srt.function_call.function_call_parser import FunctionCallParser
    from sglang.srt.parser.reasoning_parser import ReasoningParser
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from dsv4_agent.serve.encoding_adapter import build_adapter
    from dsv4_agent.serve.parsers import DSV4ReasoningDetector, DSV4ToolDetector

    FunctionCallParser.ToolCallParserEnum[TOOL_PARSER] = DSV4ToolDetector
    ReasoningParser.DetectorMap[REASONING_PARSER] = DSV4ReasoningDetector
    chat_encoding_adapters._BUILDERS[ENCODING_SPEC] = {"builtin": build_adapter}

    from dsv4_agent.serve.serving import DSV4ServingChat

    HookRegistry.register("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat", DSV4ServingChat,
                          HookType.REPLACE)
    if sys.argv and sys.argv[0].endswith("launch_server.py"):  # the HTTP server process
        from dsv4_agent.serve.guard import install

        HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", install, HookType.BEFORE)

    # our model's compressed KV pool, its sizing and the resume-state radix cache (engine side, issue 6)
    from dsv4_agent.serve import v4cache

    v4cache.register()
