"""Requests and answers of the media calls: images (at once) and videos (a job's steps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

#: What a media call is priced by: one generated image, or one second of video.
MediaUnit = Literal["image", "second"]


@dataclass(frozen=True)
class ImageRequest:
    """One validated image call for one model (what an adapter sends, and nothing else)."""

    provider: str
    model: str
    prompt: str
    n: int = 1
    #: OpenAI: ``1024x1024``, ``1536x1024``, ``1024x1536`` or ``auto``.
    size: str | None = None
    #: Gemini: ``1:1``, ``3:4``, ``4:3``, ``9:16``, ``16:9`` (image models take a few more).
    aspect_ratio: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    user: str | None = None
    #: Seconds this attempt may take (set by the policy, as for chat).
    timeout: float | None = None
    #: A per-call key, as chat requests have (media calls use the profile's key: always None).
    api_key: str | None = field(default=None, repr=False)

    def context(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model}


@dataclass(frozen=True)
class VideoRequest:
    """One validated video generation: the submit step sends it once."""

    provider: str
    model: str
    prompt: str | None
    #: The first frame: bytes and their type (a media id of the caller's is read before this is built).
    image: bytes | None = field(default=None, repr=False)
    image_mime_type: str | None = None
    duration_seconds: int | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    timeout: float | None = None
    api_key: str | None = field(default=None, repr=False)

    def context(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model}


@dataclass(frozen=True)
class OperationRequest:
    """A poll or a download of a video operation: policy-guarded like any call, never re-submitted."""

    provider: str
    model: str
    #: The operation's name (a poll) or the file's name, ``files/<id>`` (a download).
    name: str
    timeout: float | None = None
    api_key: str | None = field(default=None, repr=False)

    def context(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model}


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes = field(repr=False)
    mime_type: str


@dataclass(frozen=True)
class FilteredImage:
    """An image the provider withheld, and why (its words: ``raiFilteredReason``, a finish reason)."""

    reason: str


@dataclass
class MediaUsage:
    """What a media call is booked by: ``quantity`` units (images, or seconds of video) and their cost."""

    unit: MediaUnit
    quantity: float
    #: USD (None: no price known for the model).
    cost: Decimal | None


@dataclass
class ImageResponse:
    """The images a call made, in order, and the ones the provider filtered (with the reason)."""

    provider: str
    model: str
    images: list[GeneratedImage]
    filtered: list[FilteredImage]
    usage: MediaUsage
    attempts: list[Any] = field(default_factory=list)
    latency_ms: float | None = None

    @property
    def cost(self) -> Decimal | None:
        return self.usage.cost

    # Hooks written for chat read these: a media call has no tokens.
    input_tokens = None
    output_tokens = None
    cached = False


@dataclass
class VideoResponse:
    """A finished video job as hooks see it (after_call when it succeeds): its files and cost."""

    provider: str
    model: str
    media: list[str]
    usage: MediaUsage
    job_id: str

    @property
    def cost(self) -> Decimal | None:
        return self.usage.cost

    input_tokens = None
    output_tokens = None
    cached = False


@dataclass(frozen=True)
class OperationState:
    """One look at a video operation: still running, or how it ended."""

    done: bool
    #: The generated videos' file names (``files/<id>``): never their links.
    files: tuple[str, ...] = ()
    filtered_count: int = 0
    filtered_reasons: tuple[str, ...] = ()
    #: ``done`` with an error: its google.rpc code and message (redacted when stored).
    error_code: int | None = None
    error_message: str | None = None
    #: Videos that came inline (bytes), when the provider sends them so.
    inline: tuple[tuple[bytes, str], ...] = field(default=(), repr=False)
    progress: int | None = None


MediaRequest = ImageRequest | VideoRequest | OperationRequest

__all__ = [
    "FilteredImage",
    "GeneratedImage",
    "ImageRequest",
    "ImageResponse",
    "MediaRequest",
    "MediaUnit",
    "MediaUsage",
    "OperationRequest",
    "OperationState",
    "VideoRequest",
    "VideoResponse",
]
