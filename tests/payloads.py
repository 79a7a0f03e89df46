"""What the providers send, in one place: bodies, SSE streams and error bodies as their APIs document them.

Tests build upstream answers from these instead of writing wire shapes by
hand, so a shape is fixed once (OpenAI chat completions and chunks,
embeddings, Gemini ``generateContent`` and its SSE stream, Anthropic messages
and stream events, each provider's error body).
"""

from __future__ import annotations

import json
from typing import Any

# --- SSE ---------------------------------------------------------------------------------------


def sse_data(data: Any) -> bytes:
    """One ``data:`` event (a string as is, anything else as JSON)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# --- OpenAI ------------------------------------------------------------------------------------

OPENAI_ID = "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"


def openai_usage(prompt: int, completion: int, *, details: bool = False) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if details:
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        usage["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
    return usage


def chat_completion(
    content: str | None = "hello",
    model: str = "gpt-4o-mini",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str = "stop",
    usage: tuple[int, int] = (5, 7),
    id: str = "chatcmpl-123",
) -> dict[str, Any]:
    """A chat completion as the OpenAI API sends it."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": id,
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}],
        "usage": openai_usage(*usage),
    }


def function_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A tool call in a completion's message (``arguments`` is the JSON text the model wrote)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def openai_chunk(
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    *,
    model: str = "gpt-4o-mini-2024-07-18",
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with a choice (``usage: null``, as sent with include_usage)."""
    return {
        "id": OPENAI_ID,
        "object": "chat.completion.chunk",
        "created": 1_741_570_283,
        "model": model,
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }


def openai_usage_chunk(prompt: int = 9, completion: int = 3, **kwargs: Any) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``: no choices, only usage."""
    return {**openai_chunk(**kwargs), "choices": [], "usage": openai_usage(prompt, completion, details=True)}


def openai_role_chunk(**kwargs: Any) -> dict[str, Any]:
    return openai_chunk({"role": "assistant", "content": "", "refusal": None}, **kwargs)


def openai_text_chunks(*pieces: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [openai_chunk({"content": piece}, **kwargs) for piece in pieces]


def openai_tool_chunks(index: int, call_id: str, name: str, *fragments: str) -> list[dict[str, Any]]:
    """A streamed tool call: id and name first, then its arguments in fragments."""
    first: dict[str, Any] = {
        "tool_calls": [
            {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        ]
    }
    if index == 0:
        first = {"role": "assistant", "content": None, **first}
    return [
        openai_chunk(first),
        *(openai_chunk({"tool_calls": [{"index": index, "function": {"arguments": f}}]}) for f in fragments),
    ]


def openai_sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    return b"".join(sse_data(c) for c in chunks) + (sse_data("[DONE]") if done else b"")


def openai_text_events(
    *pieces: str, finish_reason: str = "stop", usage: tuple[int, int] = (9, 3)
) -> list[bytes]:
    """A streamed answer as separate events: role, the pieces, finish, usage, ``[DONE]``."""
    chunks = [
        openai_role_chunk(),
        *openai_text_chunks(*pieces),
        openai_chunk({}, finish_reason),
        openai_usage_chunk(*usage),
    ]
    return [*(sse_data(c) for c in chunks), sse_data("[DONE]")]


def openai_text_stream(*pieces: str, finish_reason: str = "stop", usage: tuple[int, int] = (9, 3)) -> bytes:
    return b"".join(openai_text_events(*pieces, finish_reason=finish_reason, usage=usage))


def openai_error(
    message: str, kind: str | None, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_embeddings(*vectors: list[float], model: str = "text-embedding-3-small") -> dict[str, Any]:
    """An embeddings answer, its items in reverse index order (the API does not promise an order)."""
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return {
        "object": "list",
        "data": data[::-1],
        "model": model,
        "usage": {"prompt_tokens": len(vectors), "total_tokens": len(vectors)},
    }


# --- Gemini ------------------------------------------------------------------------------------


def gemini_usage(prompt: int, candidates: int, **extra: int) -> dict[str, int]:
    total = prompt + candidates + sum(extra.values())
    return {"promptTokenCount": prompt, "candidatesTokenCount": candidates, **extra, "totalTokenCount": total}


def gemini_reply(
    *parts: dict[str, Any],
    finish: str | None = "STOP",
    usage: dict[str, int] | tuple[int, int] | None = (11, 5),
    model_version: str | None = "gemini-2.5-flash-001",
) -> dict[str, Any]:
    """A GenerateContentResponse (also one chunk of a stream) as the Gemini API sends it."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": list(parts)}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    body: dict[str, Any] = {"candidates": [candidate]}
    if usage:
        body["usageMetadata"] = gemini_usage(*usage) if isinstance(usage, tuple) else usage
    if model_version:
        body["modelVersion"] = model_version
    return body


def gemini_text(value: str) -> dict[str, Any]:
    return {"text": value}


def gemini_call(name: str, args: dict[str, Any], call_id: str | None = None, **extra: Any) -> dict[str, Any]:
    function_call: dict[str, Any] = {"name": name, "args": args}
    if call_id:
        function_call["id"] = call_id
    return {"functionCall": function_call, **extra}


def gemini_text_chunk(value: str, **extra: Any) -> dict[str, Any]:
    """A stream chunk before the last: text, no finish reason, no usage."""
    return gemini_reply(gemini_text(value), finish=None, usage=None, **extra)


def gemini_sse(*chunks: dict[str, Any]) -> str:
    """``streamGenerateContent?alt=sse``: ``data:`` lines with CRLF, no end marker."""
    return "".join(gemini_event(chunk) for chunk in chunks)


def gemini_event(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk)}\r\n\r\n"


def gemini_error(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = list(details)
    return {"error": error}


def gemini_embeddings(*vectors: list[float]) -> dict[str, Any]:
    """A ``batchEmbedContents`` answer."""
    return {"embeddings": [{"values": vector} for vector in vectors]}


# --- Anthropic ---------------------------------------------------------------------------------

ANTHROPIC_MODEL = "claude-sonnet-4-6"


def anthropic_message(
    content: list[dict[str, Any]] | None = None,
    stop_reason: str = "end_turn",
    usage: dict[str, Any] | None = None,
    model: str = ANTHROPIC_MODEL,
) -> dict[str, Any]:
    """A Messages API response body."""
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content if content is not None else [{"type": "text", "text": "Hello!"}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 12, "output_tokens": 6},
    }


def anthropic_tool_use(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def anthropic_error(kind: str, text: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": text},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }


def anthropic_event(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def anthropic_sse(*events: dict[str, Any]) -> str:
    return "".join(anthropic_event(event) for event in events)


def anthropic_message_start(input_tokens: int = 25, model: str = ANTHROPIC_MODEL) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        },
    }


def anthropic_text_block(index: int, *pieces: str) -> list[dict[str, Any]]:
    return [
        {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
        *(
            {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
            for piece in pieces
        ),
        {"type": "content_block_stop", "index": index},
    ]


def anthropic_tool_block(index: int, call_id: str, name: str, *fragments: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
        },
        *(
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": fragment},
            }
            for fragment in fragments
        ),
        {"type": "content_block_stop", "index": index},
    ]


def anthropic_message_end(stop_reason: str = "end_turn", output_tokens: int = 15) -> list[dict[str, Any]]:
    return [
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        },
        {"type": "message_stop"},
    ]


ANTHROPIC_PING = {"type": "ping"}
