"""How deeply a JSON text nests, measured before it is parsed.

The stdlib parser (which Flask's ``request.get_json`` uses) recurses once per
array or object, so ``[`` x 100000 raises ``RecursionError`` inside it, and a
body a little under the interpreter's limit still breaks whatever walks the
parsed value later (a deep copy, an SDK's serialiser). Measuring first and
refusing past a small depth keeps every later walk shallow. No well-kept
Python JSON parser takes a depth limit (orjson's is fixed at 1024, deeper
than the code after it can take), so this is written here, as two regular
expressions and a running sum that all run in C: a 4 MiB body takes a few
milliseconds.
"""

from __future__ import annotations

import re
from itertools import accumulate

#: A JSON string: a quote, then characters and escapes, then the closing quote if there is one.
#: The closing quote is optional so that an unterminated string matches once, to the end,
#: rather than failing from every later quote (which would take quadratic time).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
#: Everything that is not a bracket.
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def too_deep(text: str, limit: int) -> bool:
    """Whether ``text`` nests arrays and objects more than ``limit`` levels deep."""
    if text.count("[") + text.count("{") <= limit:  # cannot be deeper than its brackets
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if re.search(rf"[\[{{]{{{limit + 1}}}", brackets):  # a run of openers: too deep, no need to sum
        return True
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit
