"""Hypothesis strategies from the JSON Schemas in the relay's `/openapi.json`: the subset pydantic writes (objects
with properties and required keys, anyOf, enums, strings and arrays with length bounds, integers with bounds,
booleans, null, `$ref`s into `components`). Optional properties are sometimes left out, and some drawn values
step just past a bound, so both sides of every limit are exercised."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

_TEXT = st.text(max_size=60)


def from_schema(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_schema(root["components"]["schemas"][name], root))
    if "anyOf" in schema:
        return st.one_of(*(from_schema(option, root) for option in schema["anyOf"]))
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | _TEXT
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of(*(from_schema({**schema, "type": k}, root) for k in kind))
    if kind == "object":
        return _object(schema, root)
    if kind == "array":
        items = from_schema(schema.get("items", {}), root)
        low, high = schema.get("minItems", 0), schema.get("maxItems", 8)
        return st.lists(items, min_size=max(0, low - 1), max_size=min(high + 1, 12))
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 80)
        return st.text(min_size=max(0, low - 1), max_size=min(high + 1, 120))
    if kind == "integer":
        low, high = schema.get("minimum", -(10**6)), schema.get("maximum", 10**6)
        return st.integers(min_value=low - 1, max_value=high + 1) | st.integers()
    if kind == "number":
        return st.floats(allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return st.none() | st.booleans() | st.integers() | _TEXT  # no type: anything


def _object(schema: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    if not properties:
        return st.dictionaries(st.text(max_size=10), st.none() | st.integers() | _TEXT, max_size=4)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            # Required keys are nearly always present; optional ones about half the time.
            if draw(st.integers(0, 19)) < (19 if name in required else 10):
                out[name] = draw(from_schema(sub, root))
        return out

    return build()
