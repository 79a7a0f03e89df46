"""The README's code, as the suite runs it: every example a user copies is executed somewhere."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def section(heading: str) -> str:
    """The text of the README section headed ``heading``, to the next heading of its level or above.

    Lines inside code fences are never headings (a ``# path`` comment in a block is not one).
    """
    lines = README.read_text().splitlines(keepends=True)
    fenced = False
    level = 0
    kept: list[str] = []
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        heading_match = None if fenced else re.match(r"^(#+) (.*)$", line.rstrip("\n"))
        if level:
            if heading_match and len(heading_match.group(1)) <= level:
                break
            kept.append(line)
        elif heading_match and heading_match.group(2) == heading:
            level = len(heading_match.group(1))
    assert level, f"the README has no section {heading!r}"
    return "".join(kept)


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of a README section, in order."""
    return re.findall(r"```python\n(.*?)```", section(heading), re.S)
