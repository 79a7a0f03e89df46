"""The README's code, as the suite runs it: every example a user copies is executed somewhere."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def section(heading: str) -> str:
    """The text of the README section whose heading line is ``heading`` (to the next heading)."""
    text = README.read_text()
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"the README has no section {heading!r}"
    return match.group(1)


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of a README section, in order."""
    return re.findall(r"```python\n(.*?)```", section(heading), re.S)
