"""The one rule for plain-text prompt files, shared by ``sd35 generate --prompt FILE.txt`` and ``sd35 batch``.

Every other line is a prompt, stripped, as the reference's ``sd3_infer.py`` reads its ``.txt`` files; blank
lines (which the reference would turn into empty-prompt images) and ``#`` comment lines are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

RULE = "one prompt a line; blank lines and lines starting with # are skipped"


@dataclass(frozen=True)
class PromptLines:
    """The prompts of a text file with their 1-based line numbers, and the line numbers skipped."""

    prompts: tuple[tuple[int, str], ...]
    blank: tuple[int, ...]
    comments: tuple[int, ...]

    def note(self, name: str) -> str | None:
        """A one-line note naming the skipped lines, or ``None`` when none were."""
        parts = []
        for what, numbers in (("blank", self.blank), ("comment", self.comments)):
            if numbers:
                shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
                parts.append(f"{len(numbers)} {what} line{'s' if len(numbers) > 1 else ''} ({shown})")
        return f"{name}: skipped {' and '.join(parts)}" if parts else None


def split_prompt_lines(lines: Iterable[str]) -> PromptLines:
    """Apply :data:`RULE` to ``lines`` (line endings may be present)."""
    prompts, blank, comments = [], [], []
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text:
            blank.append(number)
        elif text.startswith("#"):
            comments.append(number)
        else:
            prompts.append((number, text))
    return PromptLines(tuple(prompts), tuple(blank), tuple(comments))
