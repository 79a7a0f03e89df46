"""Images and video through the LLM layer: the same pipeline as chat (hooks -> policy).

``get_llm().generate_image(prompt, model=...)`` answers at once with an
:class:`ImageResponse`; ``get_llm().generate_video(...)`` always makes a job
(:mod:`app.jobs`), whose steps call :class:`MediaCalls` here: ``submit``
(hooks' ``before_call`` then the policy: a budget reserves there), ``poll``
and ``download`` (the policy only: retries, breakers, rate limits), and
``settle`` (``after_call`` or ``on_error`` once the job has ended).

A provider request whose outcome cannot be known (a timeout or a dropped
connection after a submit was sent) is never repeated by the policy: a
second request could start a second paid generation. It fails with
:class:`SubmitOutcomeUnknownError` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from app.llm.errors import LLMBadRequestError, LLMConnectionError, LLMError, LLMTimeoutError
from app.llm.hooks import LLMCall
from app.llm.media.prices import parse_media_prices, usage
from app.llm.media.types import (
    FilteredImage,
    GeneratedImage,
    ImageRequest,
    ImageResponse,
    MediaUsage,
    OperationRequest,
    OperationState,
    VideoRequest,
    VideoResponse,
)
from app.llm.resilience.steps import Step, blocking, run_sync

if TYPE_CHECKING:
    from app.llm.client import LLM
    from app.llm.providers.base import Provider

#: Models ``generate_image`` takes, by provider family (any model of these families is tried).
IMAGE_PROVIDERS = ("gemini", "openai")
MAX_PROMPT_CHARS = 32_000


class SubmitOutcomeUnknownError(LLMError):
    """A generation request may have reached the provider but its answer was lost: not repeated."""

    http_status = 502

    @property
    def kind(self) -> str:
        return "submit_outcome_unknown"


def _text(value: Any, field: str, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise LLMBadRequestError(f"{field} must be a non-empty string", field=field)
    if len(value) > MAX_PROMPT_CHARS:
        raise LLMBadRequestError(f"{field} is longer than {MAX_PROMPT_CHARS} characters", field=field)
    return value


def _whole(value: Any, field: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LLMBadRequestError(f"{field} must be a whole number from {low} to {high}", field=field)
    return value


def _choice(value: Any, field: str, pattern: str) -> str | None:
    import re

    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise LLMBadRequestError(f"{field} {value!r} is not valid", field=field)
    return value


ASPECT_RATIO = r"\d{1,2}:\d{1,2}"


class MediaCalls:
    """One app's media calls (images now, a video's steps), on its LLM layer's pipeline."""

    def __init__(self, llm: LLM, prices: Any = None) -> None:
        self.llm = llm
        self.prices = parse_media_prices(prices)

    # --- requests -----------------------------------------------------------------

    def image_request(
        self,
        prompt: Any,
        model: Any,
        *,
        n: Any = 1,
        size: Any = None,
        aspect_ratio: Any = None,
        negative_prompt: Any = None,
        seed: Any = None,
        user: str | None = None,
    ) -> tuple[Provider, ImageRequest]:
        """The validated request (each mistake a 400 naming its field), before any hook or request."""
        from app.llm.client import split_model

        if not isinstance(model, str):
            raise LLMBadRequestError("model must be 'provider/model'", field="model")
        provider_name, model_name = split_model(model)
        request = ImageRequest(
            provider_name,
            model_name,
            cast(str, _text(prompt, "prompt", required=True)),
            n=cast(int, _whole(n, "n", 1, 10)),
            size=_choice(size, "size", r"auto|\d{3,4}x\d{3,4}"),
            aspect_ratio=_choice(aspect_ratio, "aspect_ratio", ASPECT_RATIO),
            negative_prompt=_text(negative_prompt, "negative_prompt"),
            seed=_whole(seed, "seed", 0, 2**31 - 1),
            user=user,
        )
        if size is not None and aspect_ratio is not None:
            raise LLMBadRequestError("give size or aspect_ratio, not both", field="aspect_ratio")
        adapter = self.llm.provider(provider_name)
        try:
            self._image_check(adapter, request)
        except LLMBadRequestError as exc:
            raise LLMBadRequestError(exc.message, field=exc.field, **request.context()) from None
        return adapter, request

    @staticmethod
    def _image_check(adapter: Provider, request: ImageRequest) -> None:
        family = _family(adapter)
        if family == "gemini":
            from app.llm.media import gemini

            gemini.check_image(request)
        elif family == "openai":
            from app.llm.media import openai_images

            openai_images.check_image(request)
        else:
            raise LLMBadRequestError(
                f"provider {request.provider!r} does not generate images here (gemini/... and openai/... do)",
                field="model",
            )

    def video_request(
        self,
        prompt: Any,
        model: Any,
        *,
        image: bytes | None = None,
        image_mime_type: str | None = None,
        duration_seconds: Any = None,
        aspect_ratio: Any = None,
        resolution: Any = None,
        negative_prompt: Any = None,
        seed: Any = None,
    ) -> tuple[Provider, VideoRequest]:
        from app.llm.client import split_model

        if not isinstance(model, str):
            raise LLMBadRequestError("model must be 'provider/model'", field="model")
        provider_name, model_name = split_model(model)
        request = VideoRequest(
            provider_name,
            model_name,
            _text(prompt, "prompt", required=image is None),
            image=image,
            image_mime_type=image_mime_type,
            duration_seconds=_whole(duration_seconds, "duration_seconds", 1, 60),
            aspect_ratio=_choice(aspect_ratio, "aspect_ratio", ASPECT_RATIO),
            resolution=_choice(resolution, "resolution", r"\d{3,4}p"),
            negative_prompt=_text(negative_prompt, "negative_prompt"),
            seed=_whole(seed, "seed", 0, 2**32 - 1),
        )
        adapter = self.llm.provider(provider_name)
        if _family(adapter) != "gemini":
            raise LLMBadRequestError(
                "video is generated by Veo models (gemini/veo-...)", field="model", **request.context()
            )
        from app.llm.media import gemini

        try:
            gemini.check_video(request)
        except LLMBadRequestError as exc:
            raise LLMBadRequestError(exc.message, field=exc.field, **request.context()) from None
        return adapter, request

    # --- images, at once ------------------------------------------------------------

    def generate_image(
        self, prompt: Any, model: Any, *, tenant: str | None = None, **options: Any
    ) -> ImageResponse:
        adapter, request = self.image_request(prompt, model, **options)
        call = LLMCall("image", request.provider, request.model, cast(Any, request), request.user, tenant)
        flow = self.llm.pipeline.media(
            call, lambda _address: (adapter, request), self._send_image, finish=_finish_image
        )
        return cast(ImageResponse, run_sync(flow))

    def _send_image(self, provider: Provider, request: ImageRequest) -> Step:
        def send() -> ImageResponse:
            if _family(provider) == "gemini":
                from app.llm.media import gemini

                images, filtered = gemini.generate_images(request)
            else:
                from app.llm.media import openai_images

                images, filtered = openai_images.generate_images(_profile(provider), request)
            return self._image_response(request, images, filtered)

        return blocking(send)

    def _image_response(
        self, request: ImageRequest, images: list[GeneratedImage], filtered: list[FilteredImage]
    ) -> ImageResponse:
        booked = usage(self.prices, request.provider, request.model, "image", len(images))
        return ImageResponse(request.provider, request.model, images, filtered, booked)

    # --- a video's steps --------------------------------------------------------------

    def video_call(
        self, request: VideoRequest, *, call_id: str | None, user: str | None, tenant: str | None
    ) -> LLMCall:
        """The call hooks see for a video job (the same id in every step, across processes)."""
        call = LLMCall("video", request.provider, request.model, cast(Any, request), user, tenant)
        if call_id is not None:
            call._id = call_id
        return call

    def submit(self, call: LLMCall, adapter: Provider, request: VideoRequest) -> str:
        """``before_call`` hooks, then one submit under the policy: the operation's name."""
        from app.llm.media import gemini

        flow = self.llm.pipeline.media(
            call,
            lambda _address: (adapter, request),
            lambda _provider, req: blocking(lambda: gemini.submit_video(req)),
            settle=False,
            typed=_never_repeated,
        )
        return cast(str, run_sync(flow))

    def poll(self, adapter: Provider, request: OperationRequest) -> OperationState:
        from app.llm.media import gemini

        return cast(OperationState, self._guarded(adapter, request, gemini.poll_video))

    def download(self, adapter: Provider, request: OperationRequest) -> bytes:
        from app.llm.media import gemini

        return cast(bytes, self._guarded(adapter, request, gemini.download))

    def _guarded(self, adapter: Provider, request: OperationRequest, send: Callable[[Any], Any]) -> Any:
        """The policy (rate limit, deadline, retries, breaker, timeout) around one request, no hooks."""
        typed = self.llm._typed_for(adapter, cast(Any, request))
        flow = self.llm.guards.attempt_flow(
            cast(Any, request), lambda req: blocking(lambda: send(req)), typed, [],
            usage=lambda _answer: None, tokens=lambda: 0,
        )  # fmt: skip
        return run_sync(flow)

    def video_usage(self, request: VideoRequest, seconds: float) -> MediaUsage:
        return usage(self.prices, request.provider, request.model, "second", seconds)

    def settle(self, call: LLMCall, outcome: VideoResponse | LLMError) -> None:
        """The job ended: ``after_call`` (booked) or ``on_error`` hooks, once."""
        run_sync(self.llm.pipeline.settle(call, outcome))


def _finish_image(call: LLMCall, response: ImageResponse) -> ImageResponse:
    response.latency_ms, response.attempts = call.latency_ms, call.attempts
    return response


def _never_repeated(typed: Callable[[BaseException], LLMError]) -> Callable[[BaseException], LLMError]:
    """Map a submit's errors so that one whose outcome is unknown is not retried by the policy."""

    def mapped(exc: BaseException) -> LLMError:
        error = typed(exc)
        if isinstance(error, LLMTimeoutError | LLMConnectionError):
            unknown = SubmitOutcomeUnknownError(
                f"the submit may have reached the provider ({type(error).__name__}: {error.message});"
                " it is not sent again, so that no second generation starts",
                provider=error.provider,
                model=error.model,
            )
            unknown.__cause__ = error
            return unknown
        return error

    return mapped


def _family(adapter: Provider) -> str:
    from app.llm.providers.gemini_provider import GeminiProvider

    if isinstance(adapter, GeminiProvider):
        return "gemini"
    from app.llm.providers.openai_provider import OpenAIProvider

    return "openai" if isinstance(adapter, OpenAIProvider) else "other"


def _profile(adapter: Provider) -> str:
    return str(getattr(adapter, "profile", "default"))


__all__ = [
    "FilteredImage",
    "GeneratedImage",
    "ImageResponse",
    "MediaCalls",
    "OperationState",
    "SubmitOutcomeUnknownError",
    "VideoResponse",
]
