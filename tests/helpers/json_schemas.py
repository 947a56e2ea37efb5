"""The JSON schemas of the structured-output tests (tests/engine/test_grammar.py, test_openai_structured.py,
test_grammar_serving_host.py, test_gpu_grammar.py) and their checks: every value bounded (string length, integer
range, an enum, an array's items), so that any model, even the stand-in's pseudo-random one or random weights, ends
its output within a few hundred tokens under the grammar."""

from __future__ import annotations

from typing import Any

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "tier": {"enum": ["gold", "silver"]},
    },
    "required": ["name", "age", "member", "tier"],
    "additionalProperties": False,
}


def json_schema(schema: dict[str, Any], name: str = "person") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def check_person(value: Any) -> None:
    """``value`` follows :data:`PERSON` (jsonschema's verdict where installed; the same rules by hand otherwise)."""
    try:
        import jsonschema
    except ImportError:
        assert isinstance(value, dict) and set(value) == {"name", "age", "member", "tier"}
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert type(value["age"]) is int and 0 <= value["age"] <= 150
        assert type(value["member"]) is bool and value["tier"] in ("gold", "silver")
        return
    jsonschema.validate(value, PERSON)


def _closed(properties: dict[str, Any]) -> dict[str, Any]:
    """An object schema of ``properties``, every one required, no other."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SCHEMAS: list[dict[str, Any]] = [  # varied small schemas, each bounded (as PERSON) so that any model ends
    PERSON,
    _closed({"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _closed({"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}),
    _closed({"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}}),
    _closed(
        {
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "maxItems": 4},
            "level": {"enum": ["low", "high"]},
        }
    ),
    _closed(
        {
            "point": _closed(
                {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                }
            )
        }
    ),
]


def check_schema(value: Any, schema: dict[str, Any]) -> None:
    """``value`` follows ``schema`` (one of :data:`SCHEMAS`): jsonschema's verdict where installed; otherwise the
    keywords those schemas use checked here (type, enum, properties, required, additionalProperties, string
    length, integer bounds, items and their count)."""
    try:
        import jsonschema
    except ImportError:
        _check_by_hand(value, schema, "$")
        return
    jsonschema.validate(value, schema)


_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool}


def _check_by_hand(value: Any, schema: dict[str, Any], at: str) -> None:
    if "enum" in schema:
        assert value in schema["enum"], (at, value)
        return
    kind = schema["type"]
    if kind == "integer":
        assert type(value) is int, (at, value)
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), (at, value)
        return
    assert type(value) is _TYPES[kind], (at, value)
    if kind == "string":
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)), (at, value)
    elif kind == "array":
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), (at, value)
        for i, item in enumerate(value):
            _check_by_hand(item, schema["items"], f"{at}[{i}]")
    elif kind == "object":
        assert set(schema["required"]) <= set(value) <= set(schema["properties"]), (at, sorted(value))
        for key, item in value.items():
            _check_by_hand(item, schema["properties"][key], f"{at}.{key}")
