"""Local token counts, for when the upstream reports none.

tiktoken's `o200k_base`/`cl100k_base` when their encoding files are available
offline; otherwise a documented estimate of one token per four characters (OpenAI's
own rule of thumb for English text), never less than one per word.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


@functools.cache
def _encoder() -> Callable[[str], int] | None:
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:  # No offline copy of the encoding: estimate instead.
        return None
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def count_text_tokens(text: str) -> int:
    if not text:
        return 0
    encode = _encoder()
    if encode is not None:
        return encode(text)
    return max(len(text.split()), (len(text) + 3) // 4)


def prompt_text(body: dict[str, Any]) -> str:
    """The text an upstream would count as prompt, for chat, completions,
    embeddings and responses bodies."""
    parts: list[str] = []
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            parts.append(_content_text(message.get("content")))
    for key in ("prompt", "input", "instructions"):
        value = body.get(key)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    parts.append(item)
                elif isinstance(item, dict):
                    parts.append(_content_text(item.get("content")))
    return "\n".join(p for p in parts if p)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def count_prompt_tokens(body: dict[str, Any]) -> int:
    return count_text_tokens(prompt_text(body))
