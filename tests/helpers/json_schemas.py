"""A JSON schema of the structured-output tests (tests/engine/test_grammar.py, test_openai_structured.py) and its
check: every value bounded (string length, integer range, an enum), so that any model, even the stand-in's
pseudo-random one, ends its output within a few hundred tokens under the grammar."""

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
