"""Pure checks on task result schemas (JSON Schema subset that vLLM's guidance backend honours).

A schema is "bounded" when every answer it admits has a finite, known maximum length:
arrays have maxItems, strings have maxLength or an enum, objects are closed, and
floating-point numbers (unbounded digits) are banned in favour of integers or patterned
strings. Only then can a task promise that a complete answer fits in its max_tokens.
"""

from __future__ import annotations

import json
from typing import Any

_SCALARS = {"string", "integer", "boolean", "null"}


def _types(node: dict[str, Any]) -> list[str]:
    t = node.get("type")
    if t is None:
        return []
    return [t] if isinstance(t, str) else list(t)


def bound_problems(node: dict[str, Any], path: str = "$") -> list[str]:
    """Every way `node` admits an unbounded answer, as human-readable strings."""
    problems: list[str] = []
    if "anyOf" in node:
        for i, sub in enumerate(node["anyOf"]):
            problems += bound_problems(sub, f"{path}.anyOf[{i}]")
        return problems
    if "enum" in node or "const" in node:
        return problems
    types = _types(node)
    if not types:
        return [f"{path}: no 'type' (or enum/const/anyOf): the answer is unconstrained"]
    for t in types:
        if t == "number":
            problems.append(
                f"{path}: 'number' has unbounded digits; use 'integer' with minimum/maximum "
                "or a string with a pattern and maxLength"
            )
        elif t == "string" and "maxLength" not in node:
            problems.append(f"{path}: string without maxLength or enum")
        elif t == "integer" and ("minimum" not in node or "maximum" not in node):
            problems.append(f"{path}: integer without minimum and maximum")
        elif t == "array":
            if "maxItems" not in node:
                problems.append(f"{path}: array without maxItems")
            if not isinstance(node.get("items"), dict):
                problems.append(f"{path}: array without an 'items' schema")
            else:
                problems += bound_problems(node["items"], f"{path}[]")
        elif t == "object":
            if node.get("additionalProperties") is not False:
                problems.append(f"{path}: object must set additionalProperties: false")
            props = node.get("properties") or {}
            missing = set(props) - set(node.get("required", []))
            if missing:
                problems.append(f"{path}: properties not required: {sorted(missing)}")
            for key, sub in props.items():
                problems += bound_problems(sub, f"{path}.{key}")
        elif t not in _SCALARS:
            problems.append(f"{path}: unsupported type {t!r}")
    return problems


def max_json_length(node: dict[str, Any]) -> int:
    """Longest compact JSON text (characters, no whitespace) a bounded schema admits."""
    if "anyOf" in node:
        return max(max_json_length(sub) for sub in node["anyOf"])
    if "const" in node:
        return len(json.dumps(node["const"], ensure_ascii=False))
    lengths = []
    if "enum" in node:
        lengths.append(max(len(json.dumps(v, ensure_ascii=False)) for v in node["enum"]))
    for t in _types(node):
        if "enum" in node and t != "null":
            continue
        if t == "string":
            lengths.append(node["maxLength"] + 2)
        elif t == "integer":
            lengths.append(max(len(str(node["minimum"])), len(str(node["maximum"]))))
        elif t == "boolean":
            lengths.append(5)
        elif t == "null":
            lengths.append(4)
        elif t == "array":
            n = node["maxItems"]
            lengths.append(2 + n * max_json_length(node["items"]) + max(n - 1, 0))
        elif t == "object":
            props = node.get("properties") or {}
            inner = sum(len(json.dumps(k)) + 1 + max_json_length(v) for k, v in props.items())
            lengths.append(2 + inner + max(len(props) - 1, 0))
    return max(lengths) if lengths else 0


def sample_instance(node: dict[str, Any]) -> Any:
    """A small instance valid for `node` (first enum value, minimum, minItems items...)."""
    if "anyOf" in node:
        return sample_instance(node["anyOf"][0])
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    t = _types(node)[0]
    if t == "string":
        return "x" * max(node.get("minLength", 1), 1) if "pattern" not in node else "1"
    if t == "integer":
        return node.get("minimum", 0)
    if t == "boolean":
        return False
    if t == "null":
        return None
    if t == "array":
        return [sample_instance(node["items"]) for _ in range(node.get("minItems", 1))]
    if t == "object":
        return {k: sample_instance(v) for k, v in (node.get("properties") or {}).items()}
    raise ValueError(f"unsupported schema type {t!r}")
