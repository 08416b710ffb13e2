"""The YAML reader of config files and overrides: YAML 1.2's numbers and booleans, duplicate keys refused.

PyYAML follows YAML 1.1, where `epochs: 010` is 8 (octal), `imbalance_factor: 1:10` is 70 (base 60),
`amp: off` is the boolean false and `name: 2026-11-28` a date, and where a section written twice
silently replaces the first. Here `010` is 10, `1:10` and dates stay strings (so a number key
refuses them by name), booleans are true/false only (config/keys.py also takes yes/no/on/off for
a boolean key), and a repeated key is an error naming its line.
"""
from __future__ import annotations

import collections.abc
import re

import yaml

# YAML 1.2 core schema: (tag, pattern, first characters a match can start with).
_CORE = (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
)
_REPLACED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
             "tag:yaml.org,2002:timestamp"}


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2's implicit types (null as before) and no duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys come first, ours override them
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):  # SafeLoader's own error names it
                break
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        base = {"0o": 8, "0x": 16}.get(text[:2], 10)
        return int(text[2:] if base != 10 else text, base)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in _CORE:
    StrictLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def load_yaml(text: str) -> object:
    """Parse YAML text with StrictLoader (yaml.YAMLError on bad text, nesting past Python's recursion limit too)."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply (lists or mappings inside one another past Python's recursion "
                             "limit)") from None
