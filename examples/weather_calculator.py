"""Toy agent with two tools: a calculator and a (fake) weather service.

Run a server first (`dsv4-agent serve`), then:

    python examples/weather_calculator.py "What is 17.5% of 2340, and is it warmer in Oslo or Lima?"

The model may call both tools in one turn (parallel calls); they run concurrently and the results go back
in call order. Environment: DSV4_BASE_URL (default http://127.0.0.1:30000/v1), DSV4_MODEL (optional).
"""

from __future__ import annotations

import ast
import operator
import os
import sys
from typing import Literal

from dsv4_agent.agent import Agent, Runner, tool

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:40]}")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (+ - * / ** % and parentheses).

    Args:
        expression: e.g. "2340 * 17.5 / 100".
    """
    return repr(_evaluate(ast.parse(expression, mode="eval").body))


_WEATHER = {"oslo": (-3, "snow"), "lima": (19, "overcast"), "paris": (11, "rain"), "tokyo": (15, "clear")}


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather of a city (demo data for Oslo, Lima, Paris and Tokyo).

    Args:
        city: city name.
        unit: temperature unit.
    """
    if city.lower() not in _WEATHER:
        raise KeyError(f"no weather data for {city!r}")  # fed back to the model as an error
    celsius, sky = _WEATHER[city.lower()]
    temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32, 1)
    return {"city": city, "temperature": temp, "unit": unit, "sky": sky}


def main() -> None:
    task = " ".join(sys.argv[1:]) or "What is 17.5% of 2340, and is it warmer in Oslo or Lima right now?"
    agent = Agent(
        instructions="Answer with the help of the tools. Call independent tools in parallel.",
        tools=[calculator, get_weather],
        reasoning_effort=os.environ.get("DSV4_REASONING_EFFORT", "high"),  # type: ignore[arg-type]
    )
    runner = Runner(model=os.environ.get("DSV4_MODEL"))
    result = runner.run_sync(agent, task)
    for message in result.new_messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                print(f"called {call['function']['name']}({call['function']['arguments']})")
    print(result.final_output)
    u = result.usage
    print(
        f"[{result.turns} turns, {u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), {u.completion_tokens} completion]"
    )
    runner.close()


if __name__ == "__main__":
    main()
