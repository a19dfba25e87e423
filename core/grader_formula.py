"""A multi grader's `calculate_output`: arithmetic over its graders' scores, parsed by a
small grammar (never `eval`):

    formula := sum
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := ("+" | "-") unary | atom
    atom    := NUMBER | NAME | FUNCTION "(" formula ("," formula)* ")" | "(" formula ")"

NAME is a grader's key in the multi grader's `graders`; FUNCTION is `min`, `max` (one or
more arguments) or `abs` (one). A division by zero is 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_FORMULA_CHARS = 1000
MAX_DEPTH = 32
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\S))")
FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {
    "min": (min, None),
    "max": (max, None),
    "abs": (abs, 1),
}
"""Each function, and the number of arguments it takes (None: one or more)."""


class FormulaError(ValueError):
    """Raised when a formula does not parse, or names something it may not."""


@dataclass(frozen=True)
class _Number:
    value: float


@dataclass(frozen=True)
class _Name:
    name: str


@dataclass(frozen=True)
class _Unary:
    sign: str
    operand: _Node


@dataclass(frozen=True)
class _Binary:
    operator: str
    left: _Node
    right: _Node


@dataclass(frozen=True)
class _Call:
    function: str
    arguments: tuple[_Node, ...]


_Node = _Number | _Name | _Unary | _Binary | _Call


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, position) with kind `number`, `name` or `symbol`, then an `end`."""
    found: list[tuple[str, str, int]] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:  # only trailing whitespace is left
            break
        number, name, symbol = match.groups()
        start = match.start(match.lastindex or 0)
        if number is not None:
            found.append(("number", number, start))
        elif name is not None:
            found.append(("name", name, start))
        elif symbol is not None:
            if symbol not in "+-*/(),":
                raise FormulaError(f"unexpected {symbol!r} at character {start + 1}")
            found.append(("symbol", symbol, start))
        position = match.end()
    found.append(("end", "", len(text)))
    return found


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokens(text)
        self._at = 0
        self._depth = 0

    def _peek(self) -> tuple[str, str, int]:
        return self._tokens[self._at]

    def _take(self) -> tuple[str, str, int]:
        token = self._tokens[self._at]
        self._at += 1
        return token

    def _expect(self, symbol: str) -> None:
        kind, text, position = self._take()
        if (kind, text) != ("symbol", symbol):
            found = "the end" if kind == "end" else repr(text)
            raise FormulaError(f"expected {symbol!r} at character {position + 1}, found {found}")

    def parse(self) -> _Node:
        node = self._sum()
        kind, text, position = self._peek()
        if kind != "end":
            raise FormulaError(f"unexpected {text!r} at character {position + 1}")
        return node

    def _sum(self) -> _Node:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise FormulaError(f"nested more than {MAX_DEPTH} deep")
        node = self._product()
        while self._peek()[:2] in (("symbol", "+"), ("symbol", "-")):
            node = _Binary(self._take()[1], node, self._product())
        self._depth -= 1
        return node

    def _product(self) -> _Node:
        node = self._unary()
        while self._peek()[:2] in (("symbol", "*"), ("symbol", "/")):
            node = _Binary(self._take()[1], node, self._unary())
        return node

    def _unary(self) -> _Node:
        if self._peek()[:2] in (("symbol", "+"), ("symbol", "-")):
            sign = self._take()[1]
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise FormulaError(f"nested more than {MAX_DEPTH} deep")
            node = _Unary(sign, self._unary())
            self._depth -= 1
            return node
        return self._atom()

    def _atom(self) -> _Node:
        kind, text, position = self._take()
        if kind == "number":
            return _Number(float(text))
        if kind == "name" and self._peek()[:2] == ("symbol", "("):
            return self._call(text, position)
        if kind == "name":
            return _Name(text)
        if (kind, text) == ("symbol", "("):
            node = self._sum()
            self._expect(")")
            return node
        found = "the end" if kind == "end" else repr(text)
        raise FormulaError(
            f"expected a number, a name or '(' at character {position + 1}, found {found}"
        )

    def _call(self, function: str, position: int) -> _Node:
        if function not in FUNCTIONS:
            raise FormulaError(
                f"unknown function {function!r} at character {position + 1}; "
                f"the functions are {', '.join(FUNCTIONS)}"
            )
        self._expect("(")
        arguments = [self._sum()]
        while self._peek()[:2] == ("symbol", ","):
            self._take()
            arguments.append(self._sum())
        self._expect(")")
        arity = FUNCTIONS[function][1]
        if arity is not None and len(arguments) != arity:
            raise FormulaError(f"{function} takes {arity} argument, not {len(arguments)}")
        return _Call(function, tuple(arguments))


def _names(node: _Node) -> set[str]:
    if isinstance(node, _Name):
        return {node.name}
    if isinstance(node, _Unary):
        return _names(node.operand)
    if isinstance(node, _Binary):
        return _names(node.left) | _names(node.right)
    if isinstance(node, _Call):
        return set().union(*(_names(a) for a in node.arguments))
    return set()


def _value(node: _Node, scores: Mapping[str, float]) -> float:
    if isinstance(node, _Number):
        return node.value
    if isinstance(node, _Name):
        return scores[node.name]
    if isinstance(node, _Unary):
        operand = _value(node.operand, scores)
        return -operand if node.sign == "-" else operand
    if isinstance(node, _Call):
        return float(FUNCTIONS[node.function][0](*(_value(a, scores) for a in node.arguments)))
    left, right = _value(node.left, scores), _value(node.right, scores)
    if node.operator == "+":
        return left + right
    if node.operator == "-":
        return left - right
    if node.operator == "*":
        return left * right
    return left / right if right != 0 else 0.0


@dataclass(frozen=True)
class Formula:
    """A parsed `calculate_output`."""

    text: str
    root: _Node

    @classmethod
    def parse(cls, text: str) -> Formula:
        if not text.strip():
            raise FormulaError("the formula is empty")
        if len(text) > MAX_FORMULA_CHARS:
            raise FormulaError(f"the formula is longer than {MAX_FORMULA_CHARS} characters")
        return cls(text, _Parser(text).parse())

    @property
    def names(self) -> set[str]:
        """The grader names the formula reads."""
        return _names(self.root)

    def evaluate(self, scores: Mapping[str, float]) -> float:
        """The formula's value with each name standing for its grader's score."""
        return _value(self.root, scores)
