"""The built-in tools: the current time, and a safe calculator.

``calculator`` never evaluates Python: the expression is parsed with :mod:`ast` and only
numbers, ``+ - * / // % **``, unary signs and parentheses are walked; names, calls,
attributes, strings and everything else are refused. Sizes are bounded (expression length,
integer size, exponents), so no expression can take long or eat memory.
"""

from __future__ import annotations

import ast
import datetime as dt
import math
import operator
import re
from typing import Any

from omniframe.tools import Tool

__all__ = ["CALCULATOR", "CURRENT_TIME", "CalcError", "calculate", "current_time"]

MAX_EXPRESSION_CHARS = 200
MAX_INT_BITS = 4096  # about 1233 decimal digits
MAX_EXPONENT = 10_000


class CalcError(ValueError):
    """The expression is not arithmetic the calculator does, or its result is too large."""


_WORDS = [  # what a model or a transcript may write instead of the symbols
    (r"\bmultiplied\s+by\b", "*"), (r"\btimes\b", "*"), (r"\bdivided\s+by\b", "/"),
    (r"\bover\b", "/"), (r"\bplus\b", "+"), (r"\bminus\b", "-"),
    (r"\bto\s+the\s+power\s+of\b", "**"), (r"\bmod(?:ulo)?\b", "%"),
]
_SYMBOLS = {"×": "*", "·": "*", "÷": "/", "−": "-", "^": "**", "x": "*", "X": "*"}

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _normalise(expression: str) -> str:
    text = expression.strip().rstrip("=?. ")
    for pattern, symbol in _WORDS:
        text = re.sub(pattern, symbol, text, flags=re.I)
    # "17 x 23": an x between numbers is a multiplication sign
    text = re.sub(r"(?<=[\d)\s])[xX](?=[\s\d(])", "*", text)
    for sym, op in _SYMBOLS.items():
        if sym not in "xX":
            text = text.replace(sym, op)
    return text.replace(",", "") if re.fullmatch(r"[\d,.\s+*/%()\-]+", text) else text


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise CalcError(f"the result has more than {MAX_INT_BITS} bits; too large")
    elif not math.isfinite(value):
        raise CalcError("the result is too large (not a finite number)")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalcError(f"{node.value!r} is not a number")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        value = _eval(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalcError(f"exponents are limited to ±{MAX_EXPONENT}")
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and abs(left) > 1 and abs(left).bit_length() * right > MAX_INT_BITS + 64:
                raise CalcError(f"the result would have more than {MAX_INT_BITS} bits")
            if left == 0 and right < 0:
                raise CalcError("zero to a negative power is undefined")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcError("the result is too large") from None
        if isinstance(value, complex):
            raise CalcError("the result is not a real number (a negative number to a "
                            "fractional power)")
        return _check_size(value)
    raise CalcError(f"{type(node).__name__} is not allowed: only numbers, + - * / // % ** "
                    f"and parentheses")


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression (``17 * 23``, ``2 ** 10``, ``(1 + 2) / 3``,
    ``17 times 23``); :class:`CalcError` for anything else."""
    if not isinstance(expression, str):
        raise CalcError("the expression must be text")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = _normalise(expression)
    if not text:
        raise CalcError("the expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise CalcError(f"{expression!r} is not an arithmetic expression") from exc
    try:
        value = _eval(tree)
    except RecursionError:
        raise CalcError("the expression is nested too deeply") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    return value


def _calculator(expression: str) -> dict[str, Any]:
    return {"expression": expression, "result": calculate(expression)}


def current_time(timezone: str = "") -> dict[str, Any]:
    """The current date and time in ``timezone`` (an IANA name such as ``Europe/Paris``;
    empty: this machine's local time)."""
    if timezone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            tz: dt.tzinfo | None = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as "
                             f"Europe/Paris or America/New_York") from None
        now = dt.datetime.now(tz)
    else:
        now = dt.datetime.now().astimezone()
    return {"time": now.strftime("%H:%M"), "date": now.strftime("%Y-%m-%d"),
            "weekday": now.strftime("%A"), "timezone": now.tzname() or timezone or "local",
            "iso": now.isoformat(timespec="seconds")}


CURRENT_TIME = Tool(
    name="current_time",
    description="Get the current time and date. Use it whenever the user asks what time or "
                "day it is.",
    parameters={"type": "object", "properties": {
        "timezone": {"type": "string",
                     "description": "IANA time zone such as Europe/Paris; omit it for the "
                                    "local time"}},
        "required": [], "additionalProperties": False},
    fn=current_time, timeout_s=2.0)

CALCULATOR = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses). "
                "Use it for any calculation.",
    parameters={"type": "object", "properties": {
        "expression": {"type": "string", "maxLength": MAX_EXPRESSION_CHARS,
                       "description": "the arithmetic, e.g. 17 * 23"}},
        "required": ["expression"], "additionalProperties": False},
    fn=_calculator, timeout_s=2.0)
