"""@tool: schemas from type hints and docstrings, pydantic validation, sync/async invocation; import hygiene."""

from __future__ import annotations

import enum
import subprocess
import sys
from typing import Literal

import pydantic
import pytest
from agent_fixtures import anyio_backend  # noqa: F401  (pytest fixture)
from hypothesis import given
from hypothesis import strategies as st

from dsv4_agent.agent import Agent, Tool, ToolArgumentsError, tool
from dsv4_agent.agent.tools import parse_docstring

pytestmark = pytest.mark.anyio


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(pydantic.BaseModel):
    x: float
    y: float


def test_schema_from_hints_and_google_docstring():
    @tool
    def paint(
        shape: Literal["circle", "square"], color: Color, at: Point, tags: list[str] | None = None
    ) -> str:
        """Paint a shape on the canvas.

        Longer explanation that stays in the description.

        Args:
            shape: which shape to paint.
            color: the paint colour,
                one of the palette colours.
            at (Point): where to paint it.
            tags: optional labels.

        Returns:
            A confirmation.
        """
        return "ok"

    fn = paint.to_openai()["function"]
    assert fn["name"] == "paint"
    assert (
        fn["description"]
        == "Paint a shape on the canvas.\n\nLonger explanation that stays in the description."
    )
    params = fn["parameters"]
    assert params["required"] == ["shape", "color", "at"] and params["additionalProperties"] is False
    props = params["properties"]
    assert props["shape"] == {
        "description": "which shape to paint.",
        "enum": ["circle", "square"],
        "type": "string",
    }
    assert props["color"]["description"] == "the paint colour, one of the palette colours."
    assert props["at"]["description"] == "where to paint it."
    assert params["$defs"]["Point"]["required"] == ["x", "y"]
    assert props["tags"]["default"] is None and props["tags"]["description"] == "optional labels."
    assert "title" not in str(params)


def test_numpy_and_rest_docstrings():
    summary, params = parse_docstring(
        """Scale a value.

        Parameters
        ----------
        value : float
            The input value.
        factor : float, optional
            Multiplier,
            default 2.

        Returns
        -------
        float
        """.replace("\n        ", "\n")
    )
    assert summary == "Scale a value."
    assert params == {"value": "The input value.", "factor": "Multiplier, default 2."}

    summary, params = parse_docstring(
        "Fetch a URL.\n\n:param url: the address.\n:param int timeout: seconds\n    to wait.\n:returns: the body."
    )
    assert summary == "Fetch a URL."
    assert params == {"url": "the address.", "timeout": "seconds to wait."}


@given(st.text(max_size=200))
def test_parse_docstring_never_crashes(doc):
    summary, params = parse_docstring(doc)
    assert isinstance(summary, str) and all(isinstance(v, str) and v for v in params.values())


def test_validation_errors_name_the_field():
    @tool
    def f(n: int, mode: Literal["a", "b"] = "a") -> str:
        """F."""
        return ""

    assert f.validate('{"n": "7"}').n == 7  # pydantic's lax mode: numeric strings are fine
    with pytest.raises(ToolArgumentsError, match=r"mode: Input should be 'a' or 'b'"):
        f.validate('{"n": 1, "mode": "c"}')
    with pytest.raises(ToolArgumentsError, match="must be a JSON object, got list"):
        f.validate("[1, 2]")
    with pytest.raises(ToolArgumentsError, match="not valid JSON"):
        f.validate("{'n': 1}")
    with pytest.raises(ToolArgumentsError, match="n: Field required"):
        f.validate("  ")


async def test_sync_and_async_invocation_with_validated_values():
    @tool(name="area", description="Area of a rectangle.", timeout=3)
    def rect(p: Point, scale: int = 1) -> float:
        return p.x * p.y * scale

    @tool
    async def shout(text: str) -> str:
        """Upper-case."""
        return text.upper()

    assert (rect.name, rect.description, rect.timeout, rect.is_async) == (
        "area",
        "Area of a rectangle.",
        3,
        False,
    )
    assert await rect.invoke(rect.validate('{"p": {"x": 2, "y": 3.5}, "scale": 2}')) == 14.0
    assert shout.is_async and await shout.invoke(shout.validate('{"text": "hi"}')) == "HI"


def test_bad_tool_definitions_are_rejected():
    def no_hint(x):
        """x."""

    def star(*args: int) -> None:
        """s."""

    with pytest.raises(TypeError, match="needs a type hint"):
        tool(no_hint)
    with pytest.raises(TypeError, match=r"\*args"):
        tool(star)
    with pytest.raises(ValueError, match="tool name"):
        tool(name="has space")(lambda: None)
    with pytest.raises(ValueError, match="duplicate tool names"):
        Agent(tools=[tool(name="t")(lambda: 1), tool(name="t")(lambda: 2)])
    with pytest.raises(ValueError, match="reasoning_effort"):
        Agent(reasoning_effort="extreme")  # type: ignore[arg-type]


def test_agent_wraps_plain_functions():
    def mul(a: int, b: int) -> int:
        """Multiply."""
        return a * b

    agent = Agent(tools=[mul])
    assert isinstance(agent.tools[0], Tool) and agent.tool_map()["mul"].description == "Multiply."


def test_importing_the_sdk_does_not_import_torch():
    code = (
        "import sys, dsv4_agent.agent, dsv4_agent.agent.cli, dsv4_agent.agent.builtin_tools\n"
        "heavy = sorted(m for m in ('torch', 'sglang', 'numpy', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
