"""Hypothesis strategies shared by the encoding property tests: messages, completions, pitfall mutations."""

from __future__ import annotations

import json
import re

from dsv4_agent.encoding import render_assistant
from dsv4_agent.encoding.tokens import BOS, DSML, EOS, THINK_CLOSE, THINK_OPEN
from hypothesis import strategies as st

# Plain text that holds no marker: letters, spaces, LF, quotes, '<' '>' '|', multi-byte characters.
SAFE_CHARS = st.sampled_from(list("ab z\n\t<>/|\"'=\\{}[],:") + ["é", "中", "😀", "\u200d", "ｘ", "｜"])
safe_text = st.lists(SAFE_CHARS, max_size=12).map("".join).filter(
    lambda s: DSML not in s and "|DSML|" not in s and not s.startswith("\n"))
names = st.text(alphabet="abcdefgh_xyz中", min_size=1, max_size=6)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False, width=32), safe_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)), max_leaves=6)
arguments = st.dictionaries(names, json_values, max_size=4)


@st.composite
def assistant_messages(draw, thinking: bool) -> dict:
    """An assistant message as the parser returns it (arguments in the parser's canonical layout)."""
    calls = []
    for _ in range(draw(st.integers(0, 3))):
        args = draw(arguments)
        calls.append({"type": "function", "function": {"name": draw(names), "arguments": json.dumps(args, ensure_ascii=False)}})
    content = draw(safe_text)
    # content is followed by the block's "\n\n": a trailing LF there is ambiguous, so keep it out
    if calls:
        content = content.rstrip("\n")
    return {"role": "assistant", "content": content, "reasoning_content": draw(safe_text) if thinking else "",
            "tool_calls": calls}


# Fragments for adversarial free text: whole markers, pieces of markers, multi-byte characters.
FRAGMENTS = [
    "a", "b", " ", "\n", "\n\n", "<", ">", "/", "|", "｜", "DSML", "think", "é", "中", "😀", '"', "=",
    EOS, BOS, THINK_OPEN, THINK_CLOSE, f"<{DSML}", f"</{DSML}", "<|DSML|", "</|DSML|", DSML, "|DSML|",
    "｜｜DSML｜｜", "||", "tool_calls>", "toolcalls>", "invoke", " name=\"f\">", "parameter", ' name="k" string="true">',
    ' string="false">', "parameter>", "invoke>", "[1,2]", "hello", "<｜end▁of", "<｜User｜>",
]
free_text = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)

ASCII_DSML = "|DSML|"


def _mutate(text: str, kind: str, draw) -> str:
    """Apply one pitfall class (spec section 14) to a rendered completion."""
    if kind == "no_eos":
        return text.replace(EOS, "")
    if kind == "ascii_pipes":
        return text.replace(DSML, ASCII_DSML)
    if kind == "doubled_pipes":
        return text.replace(DSML, "｜｜DSML｜｜")
    if kind == "bare_invoke":
        return text.replace(f"<{DSML}tool_calls>\n", "").replace(f"\n</{DSML}tool_calls>", "")
    if kind == "one_lf":
        return text.replace(f"\n\n<{DSML}tool_calls>", f"\n<{DSML}tool_calls>")
    if kind == "no_lf":
        return text.replace(f"\n\n<{DSML}tool_calls>", f"<{DSML}tool_calls>")
    if kind == "indent":
        return text.replace(f"\n<{DSML}", f"\n  <{DSML}").replace(f"\n</{DSML}", f"\n  </{DSML}")
    if kind == "block_in_reasoning" and THINK_CLOSE in text:
        reasoning, rest = text.split(THINK_CLOSE, 1)
        start = rest.find(f"\n\n<{DSML}tool_calls>")
        end = rest.find(f"</{DSML}tool_calls>")
        if start == -1 or end == -1:
            return text
        end += len(f"</{DSML}tool_calls>")
        return reasoning + rest[start:end] + THINK_CLOSE + rest[:start] + rest[end:]
    if kind == "invalid_typed":
        return text.replace('string="false">', 'string="false">hello ', 1)
    if kind == "duplicate_param":
        at = text.find(f"<{DSML}parameter")
        end = text.find("\n", at)
        if at != -1 and end != -1:  # (a truncated text may end inside the parameter)
            return text[:end + 1] + text[at:end + 1] + text[end + 1:]
        return text
    if kind == "truncate":
        return text[:draw(st.integers(0, len(text)))]
    if kind == "after_eos":
        return text + "junk<｜User｜>"
    if kind == "misspelled":
        return text.replace(f"<{DSML}tool_calls>", f"<{DSML}toolcalls>")
    return text


MUTATIONS = ["none", "no_eos", "ascii_pipes", "doubled_pipes", "bare_invoke", "one_lf", "no_lf", "indent", "block_in_reasoning",
             "invalid_typed", "duplicate_param", "truncate", "after_eos", "misspelled"]


def _rendered(draw, mode: str) -> str:
    text = render_assistant(draw(assistant_messages(mode == "thinking")), mode)
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        text = _mutate(text, kind, draw)
    return text


@st.composite
def completions(draw) -> tuple[str, str]:
    """(completion text, thinking_mode): rendered messages under pitfall mutations, or adversarial text."""
    mode = draw(st.sampled_from(["chat", "thinking"]))
    source = draw(st.integers(0, 5))
    if source == 0:
        return draw(free_text), mode
    if source == 1:
        return draw(st.text(max_size=40)), mode  # any unicode at all
    return _rendered(draw, mode), mode


# A marker as it starts in a completion: a DSML tag head (`<` or `</` and D, any pipe form), a bare D, a literal.
MARKER_RE = re.compile("</?[｜|]{1,2}DSML[｜|]{1,2}|[｜|]{1,2}DSML[｜|]{1,2}|"
                       + "|".join(map(re.escape, (EOS, BOS, THINK_OPEN, THINK_CLOSE))))


PIPES = ("｜", "|", "｜｜", "||", "｜|", "|｜")
MARKER_FORMS = (EOS, BOS, THINK_OPEN, THINK_CLOSE, *(f"{lead}{a}DSML{b}" for lead in ("<", "</", "") for a in PIPES for b in PIPES))


def ends_in_marker_head(text: str) -> bool:
    """`text` ends with the beginning of a marker (a lone `<` or pipe included)."""
    return any(form.startswith(text[-k:]) for form in MARKER_FORMS for k in range(1, min(len(form), len(text)) + 1))


@st.composite
def cut_inside_marker(draw) -> tuple[bytes, str, str]:
    """(UTF-8 bytes of a rendered completion cut inside a marker, the text before that marker, mode).

    The cut is anywhere in the marker's bytes from its second byte on (also inside `｜` and `▁`): what is left
    of the marker is at least two bytes, since a lone `<` at the end is text by design."""
    mode = draw(st.sampled_from(["chat", "thinking"]))
    text = _rendered(draw, mode)
    spans = [m.span() for m in MARKER_RE.finditer(text)]
    if not spans:  # EOS mutated away and no call (what is left may end in a truncated marker): an EOS alone
        text, spans = EOS, [(0, len(EOS))]
        spans = [(len(text) - len(EOS), len(text))]
    start, end = draw(st.sampled_from(spans))
    before, marker = text[:start].encode(), text[start:end].encode()
    return before + marker[:draw(st.integers(2, len(marker) - 1))], text[:start], mode


def split(data, points: list[int]) -> list:
    """`data` cut at the given points (clipped and sorted)."""
    cuts = sorted({min(max(p, 0), len(data)) for p in points})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
