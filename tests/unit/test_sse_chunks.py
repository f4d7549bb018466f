"""The router's cheap per-token path: SSE text chunks built from a per-stream template are byte for byte
what the general path (`stream_chunk` + compact `json.dumps`) gives, for both endpoints and any text."""

from __future__ import annotations

import json

import pytest

from pdserve.router import protocol as P

TEXTS = ["hi", "", 'quote " backslash \\ newline \n tab \t', "é漢字😀", "\x00\x1f\x7f", "\ud800"]


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("text", TEXTS)
def test_text_chunk_template_matches_the_general_path(kind, text):
    model = 'odd "model" name\\é'
    body = json.dumps(P.stream_chunk(kind, "cmpl-1", model, 1700000000, text, None), separators=(",", ":"))
    assert P.TextChunks(kind, "cmpl-1", model, 1700000000)(text) == f"data: {body}\n\n".encode()


def test_the_template_changes_only_the_text():
    chunks = P.TextChunks("chat", "chatcmpl-9", "m", 5)
    a, b = json.loads(chunks("a")[6:]), json.loads(chunks("bc")[6:])
    assert a["choices"][0]["delta"] == {"content": "a"} and b["choices"][0]["delta"] == {"content": "bc"}
    assert {k: v for k, v in a.items() if k != "choices"} == {k: v for k, v in b.items() if k != "choices"}


def test_queued_items_of_a_stream_coalesce_into_one_and_stop_at_an_error():
    """What waits behind a stream's item leaves with it (one chunk, one socket write); an error item, or
    the relay's exception, is held back to be handled next, and nothing is merged past the last item."""
    from collections import deque

    from pdserve.engine.messages import StepItem, WorkerError
    from pdserve.router.server import _coalesce

    q: deque = deque()  # a request's `Inbox.items`
    assert _coalesce(StepItem((1,), "a"), q) == (StepItem((1,), "a"), None)  # nothing queued: as it came
    q.extend((StepItem((2,), "b"), StepItem((3,), "c", True, "length", 3), StepItem((4,), "d")))
    merged, held = _coalesce(StepItem((1,), "a"), q)
    assert merged == StepItem((1, 2, 3), "abc", True, "length", 3) and held is None
    assert q.popleft() == StepItem((4,), "d")  # past the stream's end: left alone
    err = StepItem(finished=True, error=WorkerError(500, "boom"))
    q.extend((StepItem((2,), "b"), err))
    merged, held = _coalesce(StepItem((1,), "a"), q)
    assert merged == StepItem((1, 2), "ab") and held is err


def test_an_inbox_wakes_its_waiter_and_its_watchdog_fails_a_wait_past_the_timeout():
    """A request's `Inbox` (router.relay): an item wakes the wait under way; a wait that has lasted longer
    than the stream timeout fails with TimeoutError when the relay's watchdog looks; a shorter one does not."""
    import asyncio

    from pdserve.router.relay import Inbox

    async def run() -> None:
        loop = asyncio.get_running_loop()
        box = Inbox(loop)
        waiting = box.wait()
        box.expire(loop.time() + 0.5, timeout=1.0)  # not yet past the timeout
        box.put("item")
        await waiting
        assert box.items.popleft() == "item"
        waiting = box.wait()
        box.expire(loop.time() + 2.0, timeout=1.0)
        try:
            await waiting
        except TimeoutError:
            pass
        else:
            raise AssertionError("the wait did not time out")
        box.put("late")  # after the timeout: kept, nobody woken twice
        assert list(box.items) == ["late"]

    asyncio.run(run())
