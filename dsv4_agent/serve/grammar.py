"""xgrammar structural tags for schema-valid DSML tool blocks: forced (tool_choice required / named) and
`auto` with strict tools (free text, but an opened block must be valid).

xgrammar's builtin `deepseek_v4` tag is not used: it accepts unbounded whitespace between parameters
(a random model fills hundreds of tokens with it) and lets enum strings through raw under `string="false"`
(`> Paris <`, which parses to " Paris ", not in the enum). This tag writes exactly the encoder's layout:

    \\n\\n<｜DSML｜tool_calls>\\n
    <｜DSML｜invoke name="NAME">\\n
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>\\n   (declared order)
    </｜DSML｜invoke>\\n
    </｜DSML｜tool_calls>

Per property: a string enum/const -> `string="true"` and one of the literal values; any other plain string
-> `string="true"` and free text up to the closing tag (no DSML tag or EOS inside: `VALUE_EXCLUDES`);
everything else -> `string="false"` and JSON constrained by the property's schema (at most one whitespace
character in a row). Required properties are mandatory, optional ones may be left out. SGLang applies the
tag after `</think>` when the request thinks (its reasoner grammar backend owns the reasoning part), so
forced calls work in thinking mode too.
"""

from __future__ import annotations

from typing import Any

from xgrammar.structural_tag import (
    AnyTextFormat,
    ConstStringFormat,
    JSONSchemaFormat,
    OptionalFormat,
    OrFormat,
    SequenceFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from dsv4_agent.encoding.tokens import (
    DSML,
    EOS,
    INVOKE_CLOSE,
    PARAMETER_CLOSE,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
)

MAX_JSON_WHITESPACE = 1
# What the parser reads as structure inside a string value: a DSML tag in any pipe form, and EOS. Kept out of
# free-text values, so a value cannot open another (unchecked) call or close its own call early. Both the
# `<` and the `</` forms are listed: xgrammar 0.2.7 does not enforce an exclude that starts right after a
# partial match of the end tag (`</` + `｜DSML` passes when only `｜DSML` is excluded).
_PIPES = ("｜", "|", "｜｜", "｜|", "|｜", "||")
VALUE_EXCLUDES = [f"<{slash}{pipe}DSML" for slash in ("", "/") for pipe in _PIPES] + [EOS]


def _literal_strings(schema: dict[str, Any]) -> list[str] | None:
    if "const" in schema and isinstance(schema["const"], str):
        return [schema["const"]]
    values = schema.get("enum")
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return values
    return None


def _parameter(key: str, schema: Any, defs: dict[str, Any] | None) -> Any:
    head = f'<{DSML}parameter name="{key}" string='
    if isinstance(schema, dict):
        literals = _literal_strings(schema)
        if literals is not None:
            return SequenceFormat(elements=[
                ConstStringFormat(value=head + '"true">'),
                OrFormat(elements=[ConstStringFormat(value=v) for v in literals]) if len(literals) > 1
                else ConstStringFormat(value=literals[0]),
                ConstStringFormat(value=PARAMETER_CLOSE + "\n"),
            ])
        plain_string = schema.get("type") == "string" and not any(
            k in schema for k in ("pattern", "format", "minLength", "maxLength", "$ref", "anyOf", "oneOf", "allOf"))
        if plain_string:
            return TagFormat(begin=head + '"true">', content=AnyTextFormat(excludes=VALUE_EXCLUDES),
                             end=PARAMETER_CLOSE + "\n")
    sub = dict(schema) if isinstance(schema, dict) else {}
    if defs and "$defs" not in sub:
        sub["$defs"] = defs
    return SequenceFormat(elements=[
        ConstStringFormat(value=head + '"false">'),
        JSONSchemaFormat(json_schema=sub or True, style="json", max_whitespace_cnt=MAX_JSON_WHITESPACE),
        ConstStringFormat(value=PARAMETER_CLOSE + "\n"),
    ])


def _invoke(name: str, parameters: Any) -> TagFormat:
    schema = parameters if isinstance(parameters, dict) else {}
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    defs = schema.get("$defs")
    elements = []
    for key, sub in props.items():
        element = _parameter(key, sub, defs)
        elements.append(element if key in required else OptionalFormat(content=element))
    if not required:
        # The encoder writes a call without parameters with an empty line: `name="f">\n\n</invoke>`.
        elements.append(OptionalFormat(content=ConstStringFormat(value="\n")) if elements
                        else ConstStringFormat(value="\n"))
    content = SequenceFormat(elements=elements)
    return TagFormat(begin=f'<{DSML}invoke name="{name}">\n', content=content, end=INVOKE_CLOSE + "\n")


def auto_tool_calls_tag(tools: list[Any], parallel_tool_calls: bool) -> StructuralTag:
    """tool_choice auto with strict tools: free text, but a tool block, once opened, must be schema-valid."""
    invokes = [_invoke(t.function.name, t.function.parameters) for t in tools]
    block = TagFormat(begin=f"{TOOL_CALLS_OPEN}\n",
                      content=TagsWithSeparatorFormat(tags=invokes, separator="", at_least_one=True,
                                                      stop_after_first=not parallel_tool_calls),
                      end=TOOL_CALLS_CLOSE)
    return StructuralTag(format=TriggeredTagsFormat(triggers=[TOOL_CALLS_OPEN], tags=[block],
                                                    stop_after_first=True))


def forced_tool_calls_tag(tools: list[Any], tool_name: str | None, parallel_tool_calls: bool) -> StructuralTag:
    """`required`: at least one call of `tools` (one when not parallel). Named (`tool_name`): exactly one
    call of that tool, as OpenAI's forced function (and xgrammar's builtin "forced" choice)."""
    chosen = [t for t in tools if tool_name is None or t.function.name == tool_name]
    if not chosen:
        raise ValueError(f"tool_choice: no tool named {tool_name!r}")
    invokes = [_invoke(t.function.name, t.function.parameters) for t in chosen]
    return StructuralTag(format=SequenceFormat(elements=[
        ConstStringFormat(value=f"\n\n{TOOL_CALLS_OPEN}\n"),
        TagsWithSeparatorFormat(tags=invokes, separator="", at_least_one=True,
                                stop_after_first=tool_name is not None or not parallel_tool_calls),
        ConstStringFormat(value=TOOL_CALLS_CLOSE),
    ]))
