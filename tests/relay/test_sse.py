"""`relay.sse.SseMeter`: events pass through as they came, usage is watched and,
when the gateway asked for it on the client's behalf, taken out again."""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from relay.sse import SseMeter
from relay.tokens import count_text_tokens

USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
TOKENS = ["Hello", " there", ", gate", "way!"]


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def chat_stream(*, usage_asked: bool) -> bytes:
    """A stream as OpenAI sends it, with or without `stream_options.include_usage`."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
    extra: dict[str, Any] = {"usage": None} if usage_asked else {}

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": token}, None) for token in TOKENS]
    events.append(chunk({}, "stop"))
    if usage_asked:
        events.append(sse({**base, "choices": [], "usage": USAGE}))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def feed_in_pieces(meter: SseMeter, stream: bytes, cuts: list[int]) -> bytes:
    """Feed `stream` cut at `cuts`; everything the meter forwards, in order."""
    bounds = [0, *sorted(set(cuts)), len(stream)]
    forwarded = [meter.feed(stream[a:b]) for a, b in pairwise(bounds)]
    return b"".join(forwarded) + meter.flush()


def cut_points(stream: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=1, max_value=len(stream) - 1), max_size=40)


WITH_USAGE = chat_stream(usage_asked=True)
WITHOUT_USAGE = chat_stream(usage_asked=False)


@given(cuts=cut_points(WITH_USAGE))
def test_a_stream_cut_anywhere_passes_through_byte_identical_when_not_stripping(
    cuts,
):
    meter = SseMeter(strip_usage=False)

    forwarded = feed_in_pieces(meter, WITH_USAGE, cuts)

    assert forwarded == WITH_USAGE
    assert meter.usage == USAGE
    assert meter.saw_done


@given(cuts=cut_points(WITH_USAGE))
def test_a_stream_cut_anywhere_loses_exactly_the_injected_usage_when_stripping(cuts):
    meter = SseMeter(strip_usage=True)

    forwarded = feed_in_pieces(meter, WITH_USAGE, cuts)

    assert forwarded == WITHOUT_USAGE
    assert meter.usage == USAGE
    assert meter.saw_done


@given(cuts=cut_points(WITHOUT_USAGE))
def test_a_stream_without_usage_passes_through_byte_identical_even_when_stripping(
    cuts,
):
    meter = SseMeter(strip_usage=True)

    forwarded = feed_in_pieces(meter, WITHOUT_USAGE, cuts)

    assert forwarded == WITHOUT_USAGE
    assert meter.usage is None
    assert meter.saw_done


def test_nothing_is_forwarded_until_an_event_is_complete():
    meter = SseMeter(strip_usage=False)
    event = sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]})

    first = meter.feed(event[:-1])
    second = meter.feed(event[-1:])

    assert first == b""
    assert second == event


def test_the_usage_chunk_is_kept_when_the_client_asked_for_it():
    meter = SseMeter(strip_usage=False)
    usage_chunk = sse({"id": "c", "choices": [], "usage": USAGE})

    forwarded = meter.feed(usage_chunk)

    assert forwarded == usage_chunk
    assert meter.usage == USAGE


def test_usage_riding_on_a_chunk_with_choices_is_read_but_the_chunk_is_kept():
    meter = SseMeter(strip_usage=True)
    choice = {"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}
    event = sse({"id": "c", "choices": [choice], "usage": USAGE})

    forwarded = meter.feed(event)

    assert forwarded == event
    assert meter.usage == USAGE


def test_usage_null_fields_are_removed_only_when_stripping():
    event = sse({"id": "c", "choices": [], "usage": None})

    stripped = SseMeter(strip_usage=True).feed(event)
    kept = SseMeter(strip_usage=False).feed(event)

    assert stripped == sse({"id": "c", "choices": []})
    assert kept == event


def test_the_responses_api_usage_is_read_from_response_completed():
    meter = SseMeter(strip_usage=False)
    usage = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
    event = b"event: response.completed\n" + sse(
        {"type": "response.completed", "response": {"id": "r", "usage": usage}}
    )

    forwarded = meter.feed(event)

    assert forwarded == event
    assert meter.usage == usage


def crlf(stream: bytes) -> bytes:
    return stream.replace(b"\n", b"\r\n")


def test_crlf_framed_events_are_recognised_and_forwarded_with_lf():
    meter = SseMeter(strip_usage=True)

    forwarded = meter.feed(crlf(WITH_USAGE)) + meter.flush()

    assert forwarded == WITHOUT_USAGE
    assert meter.usage == USAGE
    assert meter.saw_done


def test_crlf_framed_events_cut_at_any_byte_are_recognised_and_forwarded_with_lf():
    stream = crlf(WITH_USAGE)
    wrong = []

    for cut in range(1, len(stream)):
        meter = SseMeter(strip_usage=True)
        forwarded = feed_in_pieces(meter, stream, [cut])
        if (forwarded, meter.usage, meter.saw_done) != (WITHOUT_USAGE, USAGE, True):
            wrong.append(cut)

    assert wrong == []


def test_a_stream_that_stops_mid_event_hands_back_the_partial_event_on_flush():
    meter = SseMeter(strip_usage=False)
    stream = chat_stream(usage_asked=False)
    cut = stream.index(b"data:", 10) + 8

    forwarded = meter.feed(stream[:cut])
    rest = meter.flush()

    assert forwarded + rest == stream[:cut]
    assert rest and not rest.endswith(b"\n\n")
    assert not meter.saw_done


@given(cuts=cut_points(WITH_USAGE))
def test_estimated_completion_tokens_count_the_streamed_content_only(cuts):
    meter = SseMeter(strip_usage=True)

    feed_in_pieces(meter, WITH_USAGE, cuts)

    assert meter.estimated_completion_tokens() == count_text_tokens("".join(TOKENS))


def test_estimated_completion_tokens_count_text_completions_and_responses_deltas():
    meter = SseMeter(strip_usage=False)
    text_chunk = sse({"choices": [{"index": 0, "text": "one two three"}]})
    delta = {"type": "response.output_text.delta", "delta": " four five"}
    responses_chunk = b"event: response.output_text.delta\n" + sse(delta)

    meter.feed(text_chunk + responses_chunk)

    assert meter.estimated_completion_tokens() == count_text_tokens(
        "one two three four five"
    )


def test_estimated_completion_tokens_are_zero_before_any_content():
    meter = SseMeter(strip_usage=False)

    meter.feed(sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))

    assert meter.estimated_completion_tokens() == 0
