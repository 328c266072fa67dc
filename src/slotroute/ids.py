"""The one rule for matching model ids, shared by slotd and the dispatcher.

A model id is any text of 1 to 255 characters (code points, after surrounding
whitespace is removed) with no control characters, so ids such as
``Qwen/Qwen3-8B``, ``llama3.2:1b`` or ``whisper.en`` travel as-is. Control
characters here are the Unicode categories Cc (C0 and C1 controls), Cf
(invisible format characters such as U+200B), Cs, Co and Cn (surrogates,
private-use and unassigned code points) and the separators Zl and Zp.

Matching ignores surrounding whitespace and letter case: two ids match when
their keys are equal, and the key is the NFC-normalized, stripped, casefolded
text. The configured spelling stays the canonical id that responses and logs use.
"""

from __future__ import annotations

import unicodedata

MAX_ID_LENGTH = 255


class InvalidModelId(ValueError):
    """A model id that breaks the id rule; the message names the value and the fix."""


def model_key(model_id: str) -> str:
    """Return the matching key of a model id."""
    return unicodedata.normalize("NFC", model_id).strip().casefold()


# Unicode categories rejected in ids; see the module docstring.
_REJECTED_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def check_model_id(model_id: str) -> str:
    """Return the id with surrounding whitespace removed, or raise InvalidModelId."""
    stripped = model_id.strip()
    if not stripped:
        raise InvalidModelId("model id is empty; pass a model id such as 'kokoro'")
    if len(stripped) > MAX_ID_LENGTH:
        raise InvalidModelId(
            f"model id of {len(stripped)} characters is longer than the maximum of "
            f"{MAX_ID_LENGTH}: {stripped[:40]!r}...; use a shorter id or an alias"
        )
    # Fast path, run on every Resolve: in ASCII the only rejected characters are the
    # control characters (category Cc), and str.isprintable() is False exactly for them.
    if stripped.isascii() and stripped.isprintable():
        return stripped
    for index, char in enumerate(stripped):
        if unicodedata.category(char) in _REJECTED_CATEGORIES:
            raise InvalidModelId(
                f"model id {stripped!r} contains the control character "
                f"U+{ord(char):04X} at position {index}; remove it"
            )
    return stripped
