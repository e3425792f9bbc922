"""`dsv4-agent serve`: DeepSeek-V4 behind SGLang's OpenAI-compatible server, through SGLang's extension points.

* `cli` builds the `sglang.launch_server` command line (our parsers, encoding, architecture, CPU setup);
* `plugin` (entry point `sglang.srt.plugins`) registers the tool-call and reasoning parsers, the chat
  encoding and the chat handler in every SGLang process;
* `embedded` builds the tiny default checkpoint and tokenizer; `models/` holds the SGLang model classes;
* `testing` starts and stops real servers for tests.
"""

# Names under which our parts are registered in SGLang.
TOOL_PARSER = "dsv4_agent"
REASONING_PARSER = "dsv4_agent"
ENCODING_SPEC = "dsv4_agent"
MODEL_ARCH = "DSV4AgentForCausalLM"  # dsv4_agent/serve/models/dsv4.py
SCRIPTED_ARCH = "DSV4ScriptedForCausalLM"  # dsv4_agent/serve/models/scripted.py (tests)
OFFICIAL_ARCHS = ("DeepseekV4ForCausalLM",)  # released checkpoints, routed to MODEL_ARCH
MODELS_PACKAGE = "dsv4_agent.serve.models"
