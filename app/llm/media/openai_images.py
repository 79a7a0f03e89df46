"""OpenAI's images API (``images.generate``) for ``openai/gpt-image-1`` and other image models.

The profile's client of the app's OpenAI connector, with the SDK's own retries
off (the layer's policy retries). ``gpt-image-1`` always answers base64 data;
older models (``dall-e-*``) are asked for it with ``response_format``.
"""

from __future__ import annotations

import base64
from typing import Any

from app.connectors.openai_connector import current_openai_connector
from app.llm.errors import LLMBadRequestError
from app.llm.media.types import FilteredImage, GeneratedImage, ImageRequest

SIZES = frozenset({"auto", "1024x1024", "1536x1024", "1024x1536", "256x256", "512x512", "1792x1024",
                   "1024x1792"})  # fmt: skip
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def check_image(request: ImageRequest) -> None:
    for name in ("aspect_ratio", "negative_prompt", "seed"):
        if getattr(request, name) is not None:
            hint = " (use size)" if name == "aspect_ratio" else ""
            raise LLMBadRequestError(f"{name} is not supported by the OpenAI images API{hint}", field=name)
    if request.size is not None and request.size not in SIZES:
        raise LLMBadRequestError(f"size must be one of {', '.join(sorted(SIZES))}", field="size")
    if not 1 <= request.n <= 10:
        raise LLMBadRequestError("the OpenAI images API makes 1 to 10 images per call", field="n")


def generate_images(profile: str, request: ImageRequest) -> tuple[list[GeneratedImage], list[FilteredImage]]:
    connector = current_openai_connector()
    client = connector.client(profile).with_options(max_retries=0)
    options: dict[str, Any] = {"model": request.model, "prompt": request.prompt, "n": request.n}
    if request.size is not None:
        options["size"] = request.size
    if request.user is not None:
        options["user"] = request.user
    if not request.model.startswith("gpt-image"):
        options["response_format"] = "b64_json"
    if request.timeout is not None and request.timeout < connector.profile(profile).timeout:
        options["timeout"] = request.timeout
    result = client.images.generate(**options)
    mime = MIME_TYPES.get(str(getattr(result, "output_format", None) or "png"), "image/png")
    images = [
        GeneratedImage(base64.b64decode(item.b64_json), mime) for item in result.data or () if item.b64_json
    ]
    missing = request.n - len(images)
    return images, [FilteredImage("the provider returned fewer images than asked")] * max(0, missing)


__all__ = ["check_image", "generate_images"]
