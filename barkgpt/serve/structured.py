"""Structured output: an OpenAI `response_format` as a llama.cpp grammar (GBNF), or a 400 naming why not.

`json_object` is llama.cpp's JSON grammar; `json_schema` goes through llama-cpp-python's port of
llama.cpp's JSON-schema-to-GBNF converter. That converter skips keywords it does not know, and
llama-cpp-python falls back to plain JSON when a schema does not convert; either would be a
constraint accepted and silently dropped. So a schema is first checked as JSON Schema
(`jsonschema`), then every keyword in it must be one the converter honours; anything else is a 400
naming the keyword and where it is.
"""
from __future__ import annotations

import json

from barkgpt.serve.schemas import ApiError, ResponseFormat

# Keywords the converter turns into grammar rules, and annotations that constrain nothing.
CONSTRAINTS = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
               "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern",
               "minLength", "maxLength", "format"}
ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
               "readOnly", "writeOnly"}
FORMATS = {"date", "time", "date-time", "uuid"}  # the string formats the converter has rules for
SUBSCHEMA_MAPS = {"properties", "$defs", "definitions"}
SUBSCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}


def bad(message: str) -> ApiError:
    return ApiError(400, message, "invalid_response_format", param="response_format")


def check_keywords(schema, where: str = "#") -> None:
    """Every keyword of `schema` (recursively) is one the grammar honours."""
    if isinstance(schema, bool):
        return
    for key, value in schema.items():
        if key not in CONSTRAINTS | ANNOTATIONS:
            raise bad(f"response_format: the JSON Schema keyword {key!r} at {where} is not supported by the "
                      f"grammar that constrains generation (supported: {', '.join(sorted(CONSTRAINTS))}); "
                      "remove it or express it with those")
        if key == "format" and value not in FORMATS:
            raise bad(f"response_format: format {value!r} at {where} is not supported (supported: "
                      f"{', '.join(sorted(FORMATS))}); remove it")
        if key in SUBSCHEMA_MAPS:
            for name, sub in value.items():
                check_keywords(sub, f"{where}/{key}/{name}")
        elif key in SUBSCHEMA_LISTS:
            for i, sub in enumerate(value):
                check_keywords(sub, f"{where}/{key}/{i}")
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            check_keywords(value, f"{where}/{key}")


def json_schema_of(fmt: ResponseFormat) -> dict | None:
    """The schema a response_format asks for: None for any JSON object; raises for a bad one."""
    if fmt.type == "json_object":
        return None
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise bad("response_format: type json_schema needs json_schema.schema (a JSON Schema object)")
    schema = fmt.json_schema.schema_
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as err:
        path = "/".join(str(p) for p in err.absolute_path) or "the top level"
        raise bad(f"response_format: json_schema.schema is not a valid JSON Schema ({err.message} at {path}); "
                  "fix the schema") from None
    check_keywords(schema)
    return schema


def grammar_for(fmt: ResponseFormat | None):
    """A llama_cpp.LlamaGrammar for a JSON response_format; None for text (or no response_format)."""
    if fmt is None or fmt.type == "text":
        return None
    schema = json_schema_of(fmt)
    from llama_cpp import llama_grammar

    if schema is None:
        return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
    try:
        return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError) as err:
        raise bad(f"response_format: the JSON Schema cannot be turned into a grammar ({type(err).__name__}: "
                  f"{err}); simplify the schema") from None
