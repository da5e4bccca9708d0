"""Reading a recipe's YAML so that what it says is what it means.

PyYAML's safe loader follows YAML 1.1: a repeated key silently replaces the first, `yes`, `on`
and `off` are booleans, `012` is octal ten, `1:30` is ninety, `1e30` is a string, and nesting
deep enough exhausts the Python stack. A recipe is read with YAML 1.2's core schema instead
(only `true`/`false` are booleans; decimal, `0o` and `0x` integers; `1e30`, `.inf` and `.nan`
are floats, which the schema then refuses where they do not belong), a repeated key is an error
naming its path and line, and nesting stops at a depth no recipe needs.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 64

_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(
    r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"
)
_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")


class YamlProblem(Exception):
    """A recipe YAML that parses but means something other than it seems: `where` is the line."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars, unique keys and a depth limit."""

    yaml_implicit_resolvers: dict = {}  # filled below, from SafeLoader's minus 1.1's scalars

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise YamlProblem(f"nested more than {MAX_DEPTH} levels deep", mark.line + 1)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlProblem(
                    f"key '{key}' appears twice in one mapping (lines {seen[key]} and {line})",
                    line,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


for _first, _resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items():
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, pattern) for tag, pattern in _resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]  # fmt: skip
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(f"^(?:{_BOOL.pattern})$"),
                              list("tTfF"))  # fmt: skip
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(f"^(?:{_INT.pattern})$"),
                              list("-+0123456789"))  # fmt: skip
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_FLOAT.pattern})$"),
                              list("-+.0123456789"))  # fmt: skip
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml(text: str) -> Any:
    """The recipe's data; yaml.YAMLError for bad syntax, YamlProblem for the traps above."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
