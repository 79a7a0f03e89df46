"""One LLM interface over every provider.

>>> from app.llm import get_llm
>>> r = get_llm().chat([{"role": "user", "content": "Hi"}], model="openai/gpt-4o-mini")

Importing this package imports no SDK: each provider's adapter (and its SDK)
loads on the first call that addresses it.
"""

from __future__ import annotations

from app.llm.client import LLM, get_llm, init_app
from app.llm.errors import (
    LLMAuthError,
    LLMBadRequestError,
    LLMBulkheadFullError,
    LLMCircuitOpenError,
    LLMConnectionError,
    LLMContentFilterError,
    LLMContextLengthError,
    LLMError,
    LLMNotConfiguredError,
    LLMNotFoundError,
    LLMPermissionError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
)
from app.llm.streaming import AsyncChatStream, ChatStream
from app.llm.types import ChatResponse, ToolCall

__all__ = [
    "LLM",
    "AsyncChatStream",
    "ChatResponse",
    "ChatStream",
    "LLMAuthError",
    "LLMBadRequestError",
    "LLMBulkheadFullError",
    "LLMCircuitOpenError",
    "LLMConnectionError",
    "LLMContentFilterError",
    "LLMContextLengthError",
    "LLMError",
    "LLMNotConfiguredError",
    "LLMNotFoundError",
    "LLMPermissionError",
    "LLMRateLimitError",
    "LLMResponseError",
    "LLMServerError",
    "LLMTimeoutError",
    "ToolCall",
    "get_llm",
    "init_app",
]
