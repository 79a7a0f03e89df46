"""A fake Gemini server speaking the wire protocol google-genai uses for media, on ScriptedServer.

- ``POST .../models/<imagen>:predict``: Imagen; ``predictions`` with ``bytesBase64Encoded``, or
  ``raiFilteredReason`` for the images scripted as filtered.
- ``POST .../models/<model>:generateContent``: a Gemini image model; one ``inlineData`` image part,
  or ``finishReason: IMAGE_SAFETY`` when scripted.
- ``POST .../models/<veo>:predictLongRunning``: starts an operation ``models/<veo>/operations/<id>``
  (counted per prompt in ``submits``).
- ``GET .../models/<veo>/operations/<id>``: ``done`` after ``polls_until_done`` polls, then the
  scripted ``outcome``: ``video`` (a ``generatedSamples`` video whose ``uri`` is a download link),
  ``no_response`` (``done`` alone), ``filtered`` (``raiMediaFilteredCount``/``Reasons``) or ``error``.
- ``GET .../files/<id>:download?alt=media``: the video's bytes, only with the key in
  ``x-goog-api-key`` (as the real API wants it).

``gates[name]`` (``submit``, ``poll``, ``download``) holds the next such request open until the
test sets the event; ``arrived[name]`` says that one came.
"""

from __future__ import annotations

import base64
import itertools
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from tests.servers import WAIT, Recorded, Reply, ScriptedServer

#: A real 1x1 PNG (what an image upstream sends, and what an image input may be).
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 64


@dataclass
class Operation:
    name: str
    prompt: str
    polls: int = 0


@dataclass
class FakeGemini:
    key: str
    server: ScriptedServer = field(init=False)
    #: What finished operations end with: video, no_response, filtered, error.
    outcome: str = "video"
    polls_until_done: int = 1
    #: Imagen images to answer as filtered (by position), with this reason.
    filtered_images: set[int] = field(default_factory=set)
    filter_reason: str = "Unsafe image: it may contain a person (support code 12345)"
    submits: Counter[str] = field(default_factory=Counter)
    operations: dict[str, Operation] = field(default_factory=dict)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    arrived: dict[str, threading.Event] = field(default_factory=dict)
    video: bytes = MP4
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.server = ScriptedServer(self.respond)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def gate(self, name: str) -> tuple[threading.Event, threading.Event]:
        """Hold the next ``name`` request open: (release it, it has arrived)."""
        self.gates[name], self.arrived[name] = threading.Event(), threading.Event()
        return self.gates[name], self.arrived[name]

    def _hold(self, name: str) -> None:
        gate = self.gates.pop(name, None)
        if gate is not None:
            self.arrived[name].set()
            gate.wait(WAIT)

    def count(self, suffix: str) -> int:
        return sum(1 for request in self.server.requests if request.path.endswith(suffix))

    def respond(self, request: Recorded) -> Reply:
        if request.headers.get("x-goog-api-key") != self.key:
            return Reply(
                401, {"error": {"code": 401, "message": "API key not valid", "status": "UNAUTHENTICATED"}}
            )
        path = request.path
        if path.endswith(":predict"):
            return self._imagen(request)
        if path.endswith(":generateContent"):
            return self._image_model(request)
        if path.endswith(":predictLongRunning"):
            self._hold("submit")
            return self._submit(request)
        if re.search(r"/operations/[^/]+$", path):
            self._hold("poll")
            return self._poll(path)
        if path.endswith(":download"):
            self._hold("download")
            if request.query.get("alt") != "media":
                return Reply(
                    400, {"error": {"code": 400, "message": "alt=media needed", "status": "INVALID_ARGUMENT"}}
                )
            return Reply(200, self.video, {"Content-Type": "video/mp4"})
        return Reply(404, {"error": {"code": 404, "message": f"no {path}", "status": "NOT_FOUND"}})

    def _imagen(self, request: Recorded) -> Reply:
        body = request.json
        count = body["parameters"].get("sampleCount", 1)
        predictions = []
        for index in range(count):
            if index in self.filtered_images:
                predictions.append({"raiFilteredReason": self.filter_reason})
            else:
                predictions.append({"bytesBase64Encoded": base64.b64encode(PNG + bytes([index])).decode(),
                                    "mimeType": "image/png"})  # fmt: skip
        return Reply(200, {"predictions": predictions})

    def _image_model(self, request: Recorded) -> Reply:
        number = len([r for r in self.server.requests if r.path.endswith(":generateContent")]) - 1
        if number in self.filtered_images:
            candidate = {"finishReason": "IMAGE_SAFETY", "finishMessage": self.filter_reason, "index": 0}
        else:
            data = base64.b64encode(PNG + bytes([number])).decode()
            part = {"inlineData": {"mimeType": "image/png", "data": data}}
            candidate = {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
        return Reply(
            200,
            {
                "candidates": [candidate],
                "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1290},
            },
        )

    def _submit(self, request: Recorded) -> Reply:
        model = re.search(r"models/([^/:]+):predictLongRunning", request.path).group(1)  # type: ignore[union-attr]
        prompt = request.json["instances"][0].get("prompt", "")
        self.submits[prompt] += 1
        name = f"models/{model}/operations/op{next(self._ids)}x{len(self.operations)}"
        self.operations[name] = Operation(name, prompt)
        return Reply(200, {"name": name})

    def _poll(self, path: str) -> Reply:
        name = path[path.index("models/") :]
        operation = self.operations.get(name)
        if operation is None:
            return Reply(404, {"error": {"code": 404, "message": "no such operation", "status": "NOT_FOUND"}})
        operation.polls += 1
        if operation.polls <= self.polls_until_done:
            return Reply(200, {"name": name, "done": False, "metadata": {}})
        if self.outcome == "no_response":
            return Reply(200, {"name": name, "done": True})
        if self.outcome == "error":
            return Reply(
                200, {"name": name, "done": True, "error": {"code": 3, "message": "prompt rejected"}}
            )
        if self.outcome == "filtered":
            reasons = ["The video violates policy (code 58061214)"]
            response = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {"raiMediaFilteredCount": 1, "raiMediaFilteredReasons": reasons},
            }
            return Reply(200, {"name": name, "done": True, "response": response})
        file_id = "f" + name.rsplit("/", 1)[1].replace("x", "y")
        uri = f"https://generativelanguage.googleapis.com/v1beta/files/{file_id}:download?alt=media"
        response = {"generateVideoResponse": {"generatedSamples": [{"video": {"uri": uri}}]}}
        return Reply(200, {"name": name, "done": True, "response": response})

    def stop(self) -> None:
        for gate in list(self.gates.values()):
            gate.set()
        self.server.stop()
