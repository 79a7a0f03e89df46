"""Gemini's media calls through google-genai: images (Imagen, Gemini image models) and Veo video.

Gemini image models answer ``models.generate_content`` with image parts
(``response_modalities=["IMAGE"]``), one image per request. Imagen's
``:predict`` and Veo's ``:predictLongRunning`` are sent through the SDK's
own API client: google-genai 3 refuses ``models.generate_images`` and
``models.generate_videos`` on the Gemini Developer API (client-side, "only
supported in Gemini Enterprise Agent Platform mode"), while its request
transport (key header, base URL, timeout, the test kit's guard) and its
public ``operations.get``, ``files.download`` and ``GenerateVideosOperation``
parsing still serve them. The request's source and settings are built as the
SDK's own ``GenerateVideosSource`` and ``GenerateVideosConfig`` (validated by
its types) and written in the Developer API's wire form, the fields of the
SDK's former converter. Vertex AI is not wired here: it is refused by name.

The video's link is never kept: only the file's name (``files/<id>``), which
``files.download`` turns into a request with the key in a header.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.genai import types

from app.llm.errors import LLMBadRequestError, LLMNotConfiguredError, LLMResponseError
from app.llm.media.types import (
    FilteredImage,
    GeneratedImage,
    ImageRequest,
    OperationRequest,
    OperationState,
    VideoRequest,
)
from app.services.genai_service import get_genai_client

#: Finish reasons of a Gemini image model that mean the image was withheld.
IMAGE_FILTER_REASONS = frozenset(
    {"SAFETY", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII",
     "RECITATION", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE"}
)  # fmt: skip


def is_imagen(model: str) -> bool:
    return model.removeprefix("models/").startswith("imagen-")


def is_veo(model: str) -> bool:
    return model.removeprefix("models/").startswith("veo-")


def _client() -> Any:
    client = get_genai_client()
    if getattr(client, "vertexai", False):
        raise LLMNotConfiguredError(
            "image and video generation is wired for the Gemini Developer API (GEMINI_API_KEY);"
            " with GOOGLE_GENAI_USE_VERTEXAI it is not available yet",
            provider="gemini",
            setting="GOOGLE_GENAI_USE_VERTEXAI",
        )
    return client


def _options(timeout: float | None) -> types.HttpOptions | None:
    if timeout is None:
        return None
    from app.connectors.genai_connector import current_genai_connector

    if timeout >= current_genai_connector().settings.timeout:
        return None
    return types.HttpOptions(timeout=max(1, round(timeout * 1000)))


def _path(model: str, method: str) -> str:
    name = model if model.startswith("models/") else f"models/{model}"
    return f"{name}:{method}"


def _post(path: str, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """POST through the SDK's transport; its APIError reaches the Gemini adapter's map_error."""
    response = _client()._api_client.request("post", path, body, _options(timeout))
    try:
        answer = json.loads(response.body) if response.body else {}
    except ValueError:
        raise LLMResponseError("Gemini sent a response that is not JSON", provider="gemini") from None
    if not isinstance(answer, dict):
        raise LLMResponseError("Gemini sent a response that is not a JSON object", provider="gemini")
    return answer


# --- checks --------------------------------------------------------------------------


def check_image(request: ImageRequest) -> None:
    if request.size is not None:
        raise LLMBadRequestError("Gemini takes aspect_ratio, not size", field="size")
    if is_imagen(request.model):
        for name in ("negative_prompt", "seed"):
            if getattr(request, name) is not None:
                raise LLMBadRequestError(
                    f"{name} is not supported by Imagen on the Gemini Developer API", field=name
                )
        if not 1 <= request.n <= 4:
            raise LLMBadRequestError("Imagen makes 1 to 4 images per call", field="n")
    elif request.negative_prompt is not None:
        raise LLMBadRequestError("Gemini image models take no negative_prompt", field="negative_prompt")


def check_video(request: VideoRequest) -> None:
    if not is_veo(request.model):
        raise LLMBadRequestError(f"{request.model!r} is not a Veo model (veo-...)", field="model")
    if request.seed is not None:
        raise LLMBadRequestError("seed is not supported by Veo on the Gemini Developer API", field="seed")
    if request.prompt is None and request.image is None:
        raise LLMBadRequestError("a video needs a prompt, an image, or both", field="prompt")


# --- images ------------------------------------------------------------------------------


def generate_images(request: ImageRequest) -> tuple[list[GeneratedImage], list[FilteredImage]]:
    if is_imagen(request.model):
        return _imagen(request)
    return _image_model(request)


def _imagen(request: ImageRequest) -> tuple[list[GeneratedImage], list[FilteredImage]]:
    parameters: dict[str, Any] = {"sampleCount": request.n, "includeRaiReason": True}
    if request.aspect_ratio is not None:
        parameters["aspectRatio"] = request.aspect_ratio
    body = {"instances": [{"prompt": request.prompt}], "parameters": parameters}
    answer = _post(_path(request.model, "predict"), body, request.timeout)
    images: list[GeneratedImage] = []
    filtered: list[FilteredImage] = []
    for prediction in answer.get("predictions") or ():
        if not isinstance(prediction, dict):
            continue
        data = prediction.get("bytesBase64Encoded")
        if data:
            images.append(GeneratedImage(base64.b64decode(data), prediction.get("mimeType") or "image/png"))
        elif prediction.get("raiFilteredReason"):
            filtered.append(FilteredImage(str(prediction["raiFilteredReason"])))
    missing = request.n - len(images) - len(filtered)
    filtered += [FilteredImage("the provider returned no image and no reason")] * max(0, missing)
    return images, filtered


def _image_model(request: ImageRequest) -> tuple[list[GeneratedImage], list[FilteredImage]]:
    """One ``generate_content`` per image: these models answer one image per request."""
    config = types.GenerateContentConfig(response_modalities=["IMAGE"])
    if request.aspect_ratio is not None:
        config.image_config = types.ImageConfig(aspect_ratio=request.aspect_ratio)
    if request.seed is not None:
        config.seed = request.seed
    config.http_options = _options(request.timeout)
    client = _client()
    images: list[GeneratedImage] = []
    filtered: list[FilteredImage] = []
    for _ in range(request.n):
        response = client.models.generate_content(model=request.model, contents=request.prompt, config=config)
        image, reason = _first_image(response)
        if image is not None:
            images.append(image)
        else:
            filtered.append(FilteredImage(reason))
    return images, filtered


def _first_image(response: Any) -> tuple[GeneratedImage | None, str]:
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and feedback.block_reason is not None:
        return None, f"prompt blocked: {_name(feedback.block_reason)}"
    for candidate in response.candidates or ():
        for part in (candidate.content.parts if candidate.content is not None else None) or ():
            if part.inline_data is not None and part.inline_data.data:
                return GeneratedImage(part.inline_data.data, part.inline_data.mime_type or "image/png"), ""
        reason = _name(candidate.finish_reason)
        if reason:
            message = getattr(candidate, "finish_message", None)
            return None, f"{reason}: {message}" if message else reason
    return None, "the provider returned no image and no reason"


def _name(value: Any) -> str:
    return "" if value is None else str(getattr(value, "value", value))


# --- video -------------------------------------------------------------------------------


def video_body(request: VideoRequest) -> dict[str, Any]:
    """The ``:predictLongRunning`` body, from the SDK's own source and config types."""
    image = (
        types.Image(image_bytes=request.image, mime_type=request.image_mime_type or "image/png")
        if request.image is not None
        else None
    )
    source = types.GenerateVideosSource(prompt=request.prompt, image=image)
    config = types.GenerateVideosConfig(
        number_of_videos=1,
        duration_seconds=request.duration_seconds,
        aspect_ratio=request.aspect_ratio,
        resolution=request.resolution,
        negative_prompt=request.negative_prompt,
    )
    instance: dict[str, Any] = {}
    if source.prompt is not None:
        instance["prompt"] = source.prompt
    if source.image is not None and source.image.image_bytes is not None:
        instance["image"] = {
            "bytesBase64Encoded": base64.b64encode(source.image.image_bytes).decode(),
            "mimeType": source.image.mime_type,
        }
    wire = {
        "sampleCount": config.number_of_videos,
        "durationSeconds": config.duration_seconds,
        "aspectRatio": config.aspect_ratio,
        "resolution": config.resolution,
        "negativePrompt": config.negative_prompt,
    }
    return {"instances": [instance], "parameters": {k: v for k, v in wire.items() if v is not None}}


def submit_video(request: VideoRequest) -> str:
    """Start the generation; the operation's name (the job keeps it before anything else happens)."""
    answer = _post(_path(request.model, "predictLongRunning"), video_body(request), request.timeout)
    name = answer.get("name")
    if not isinstance(name, str) or not name:
        raise LLMResponseError("Gemini started no operation (no name in its answer)", **request.context())
    return name


def poll_video(request: OperationRequest) -> OperationState:
    config = types.GetOperationConfig(http_options=_options(request.timeout))
    operation = _client().operations.get(
        types.GenerateVideosOperation.model_validate({"name": request.name}), config=config
    )
    if not operation.done:
        progress = (operation.metadata or {}).get("progressPercent")
        return OperationState(False, progress=int(progress) if isinstance(progress, int | float) else None)
    if operation.error:
        code = operation.error.get("code")
        return OperationState(
            True,
            error_code=int(code) if isinstance(code, int) else None,
            error_message=str(operation.error.get("message") or "no message"),
        )
    response = operation.response
    if response is None:
        return OperationState(True)
    files: list[str] = []
    inline: list[tuple[bytes, str]] = []
    for generated in response.generated_videos or ():
        video = generated.video
        if video is None:
            continue
        if video.uri:
            files.append(file_name(video.uri))
        elif video.video_bytes:
            inline.append((video.video_bytes, video.mime_type or "video/mp4"))
    return OperationState(
        True,
        files=tuple(files),
        filtered_count=response.rai_media_filtered_count or 0,
        filtered_reasons=tuple(response.rai_media_filtered_reasons or ()),
        inline=tuple(inline),
    )


def file_name(uri: str) -> str:
    """``files/<id>`` of a download link (its query, and any key in it, is dropped)."""
    from google.genai import _transformers

    return "files/" + _transformers.t_file_name(
        uri.split("?", 1)[0] if not uri.startswith("https://") else uri
    )


def download(request: OperationRequest) -> bytes:
    data = _client().files.download(
        file=request.name, config=types.DownloadFileConfig(http_options=_options(request.timeout))
    )
    return bytes(data)


__all__ = [
    "check_image",
    "check_video",
    "download",
    "file_name",
    "generate_images",
    "is_imagen",
    "is_veo",
    "poll_video",
    "submit_video",
    "video_body",
]
