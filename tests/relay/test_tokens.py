"""Local token counts: tiktoken's cl100k, read offline and hash-checked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.tokens import count_prompt_tokens, count_text_tokens


def test_text_is_counted_with_cl100k_not_estimated():
    # cl100k splits "tokenization" into "token" + "ization"; a words-or-chars
    # estimate would say 1 word or 3 characters-per-4.
    assert count_text_tokens("tokenization") == 2
    assert count_text_tokens("hello there world, how are you doing today?") == 10


def test_a_chat_prompt_counts_every_message_and_text_part():
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello world"}]},
        ]
    }

    assert count_prompt_tokens(body) == count_text_tokens("be brief\nhello world")


def test_completions_embeddings_and_responses_inputs_are_counted():
    assert count_prompt_tokens({"prompt": "hello world"}) == 2
    assert count_prompt_tokens({"input": ["hello", "world"]}) == 3
    assert count_prompt_tokens({"input": "hello world", "instructions": "be brief"}) > 2


@given(st.text(max_size=300))
def test_counting_any_text_never_fails_and_empty_text_is_zero(text):
    count = count_text_tokens(text)

    assert count >= 0
    assert (count == 0) == (text == "")
