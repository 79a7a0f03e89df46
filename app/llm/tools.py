"""Tools in any of three forms, normalised to name + description + JSON schema.

Accepted: OpenAI-style ``{"type": "function", "function": {...}}``, the flat
``{"name", "description", "parameters"}``, or a plain Python function whose
type hints (through pydantic) and docstring become the schema.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from app.llm.errors import LLMBadRequestError
from app.llm.types import check_texts

if TYPE_CHECKING:
    from pydantic import BaseModel


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """``auto``, ``none``, ``required``, or one named tool (``mode="tool"``)."""

    mode: Literal["auto", "none", "required", "tool"]
    name: str | None = None


EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}

#: What OpenAI, Anthropic and Gemini all accept as a function name.
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def normalise_tools(tools: Sequence[Any] | None) -> list[ToolSpec]:
    """Validate tools into :class:`ToolSpec` values.

    A bad one is an LLMBadRequestError whose ``field`` is the path to it
    (``tools[1].parameters``, ``tools[0].function.name``).
    """
    if not tools:
        return []
    if isinstance(tools, str | Mapping) or not isinstance(tools, Sequence):
        raise LLMBadRequestError("tools must be a list of tool definitions", field="tools")
    specs = [_tool(index, tool) for index, tool in enumerate(tools)]
    seen: set[str] = set()
    for index, spec in enumerate(specs):
        if not TOOL_NAME.fullmatch(spec.name):
            raise LLMBadRequestError(
                f"tools[{index}] has the name {spec.name!r}; a tool name is 1 to 64 letters, digits, _ or -",
                field=_name_field(index, tools[index]),
            )
        if spec.name in seen:
            raise LLMBadRequestError(
                f"tools[{index}] repeats the name {spec.name!r}; tool names must be unique",
                field=_name_field(index, tools[index]),
            )
        seen.add(spec.name)
    return specs


def _in_openai_form(tool: Any) -> bool:
    return isinstance(tool, Mapping) and tool.get("type") == "function"


def _name_field(index: int, tool: Any) -> str:
    """Where a tool's name is: ``tools[i].name``, or ``tools[i].function.name`` in the OpenAI form."""
    if callable(tool) and not isinstance(tool, Mapping):
        return f"tools[{index}]"  # a function: its __name__
    return f"tools[{index}].function.name" if _in_openai_form(tool) else f"tools[{index}].name"


def _tool(index: int, tool: Any) -> ToolSpec:
    where = f"tools[{index}]"
    if callable(tool) and not isinstance(tool, Mapping):
        return tool_from_function(tool)
    if not isinstance(tool, Mapping):
        raise LLMBadRequestError(f"{where} must be a dict or a function", field=where)
    openai_form = _in_openai_form(tool)
    function = tool.get("function") if openai_form else tool
    if openai_form and not isinstance(function, Mapping):
        raise LLMBadRequestError(
            f"{where} needs a name (flat form) or a function.name (OpenAI form)", field=f"{where}.function"
        )
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise LLMBadRequestError(
            f"{where} needs a name (flat form) or a function.name (OpenAI form)",
            field=_name_field(index, tool),
        )
    parameters = function.get("parameters") or EMPTY_OBJECT
    if not isinstance(parameters, Mapping):
        at = f"{where}.function.parameters" if openai_form else f"{where}.parameters"
        raise LLMBadRequestError(f"{where}.parameters must be a JSON schema object", field=at)
    at = f"{where}.function" if openai_form else where
    check_texts(f"{at}.description", function.get("description") or "")
    check_texts(f"{at}.parameters", parameters)
    return ToolSpec(function["name"], str(function.get("description") or ""), copy.deepcopy(dict(parameters)))


def arguments_model(function: Callable[..., Any], *, forbid_extra: bool = False) -> type[BaseModel]:
    """A pydantic model of ``function``'s parameters, from their type hints and defaults.

    The schema sent to the model is this model's; ``llm.run()`` validates the model's
    arguments with it (``forbid_extra``: an argument the function does not take is an error).
    ``*args`` and ``**kwargs`` are left out.
    """
    import inspect  # only tools given as functions need it

    from pydantic import ConfigDict, create_model

    signature = inspect.signature(function)
    hints = inspect.get_annotations(function, eval_str=True)
    fields: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (annotation, default)
    config = ConfigDict(extra="forbid") if forbid_extra else None
    return create_model(f"{function.__name__}_arguments", __config__=config, **fields)


def tool_from_function(function: Callable[..., Any]) -> ToolSpec:
    """A tool from a function: its parameters' type hints make the schema, its docstring the description."""
    import inspect

    schema = arguments_model(function).model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    doc = inspect.getdoc(function) or ""
    return ToolSpec(function.__name__, doc.strip(), schema)


def normalise_tool_choice(choice: Any, tools: Sequence[ToolSpec]) -> ToolChoice | None:
    if choice is None:
        return None
    if choice == "required" and not tools:
        raise LLMBadRequestError("tool_choice 'required' needs tools", field="tool_choice")
    if choice in ("auto", "none", "required"):
        return ToolChoice(choice)
    if isinstance(choice, Mapping):  # {"type": "function", "function": {"name": ...}}, any JSON inside
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
    else:
        name = choice
    if isinstance(name, str) and any(tool.name == name for tool in tools):
        return ToolChoice("tool", name)
    raise LLMBadRequestError(
        f"tool_choice must be 'auto', 'none', 'required' or the name of a given tool, got {choice!r}",
        field="tool_choice",
    )
