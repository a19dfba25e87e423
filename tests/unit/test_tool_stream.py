"""How a streamed chat answer gives tool calls (api/routes/openai_serving.py `_Answer`),
fed its token stream by hand: `auto` streams the text before a call and holds back what may
open one; the calls come whole at the end; a named call streams its arguments."""

from __future__ import annotations

import json
from typing import Any, cast

from api.job_follow import JobState, Token
from api.routes.openai_serving import Created, _Answer
from api.serving_requests import chat_request
from core.enums import JobStatus
from core.tools import forced_function, sendable_content
from db.outputs import OutputRecord

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}
TEXT = 'Let me <b>check</b>.\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'


def answer_for(**body: Any) -> _Answer:
    serving = chat_request(
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True, **body},
        100,
    )
    state = JobState(JobStatus.RUNNING, 1, None, None)
    created = Created("job_1", state, 1, idempotent=False, replayed=False)
    none = cast("Any", None)  # settings, publisher, principal: not used here
    return _Answer(serving, none, none, none, created, "chatcmpl-job_1")


def events(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(c.decode().removeprefix("data: ").strip()) for c in chunks]


def feed(answer: _Answer, text: str, size: int) -> list[str]:
    """The content pieces an auto answer streams while `text` arrives `size` characters at
    a time."""
    pieces = []
    for start in range(0, len(text), size):
        answer.take(Token(0, 0, text[start : start + size], "1-0"))
        so_far = answer.streamed[0]
        piece = answer._content_piece(0, so_far, sendable_content(so_far))
        if piece:
            pieces.append(piece)
    return pieces


def record(text: str, finish: str = "stop") -> OutputRecord:
    return OutputRecord(0, 0, text, finish, 4, 20, None)


def test_auto_streams_the_text_before_a_call_then_the_call_whole() -> None:
    for size in (1, 3, 7, len(TEXT)):
        answer = answer_for(tools=[WEATHER])
        pieces = feed(answer, TEXT, size)
        assert "".join(pieces) == TEXT[: TEXT.index("<tool_call>")]  # "<b>" was let through
        ending = events(list(answer._ending(0, record(TEXT), TEXT, None, False, True)))
        assert all(not e["choices"][0]["delta"].get("content") for e in ending)
        [call] = ending[0]["choices"][0]["delta"]["tool_calls"]
        assert (call["index"], call["function"]["name"]) == (0, "get_weather")
        assert ending[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_text_without_a_call_ends_with_what_was_held_back() -> None:
    text = "Sunny <tool"  # looked like a call's start until the end
    answer = answer_for(tools=[WEATHER])
    assert "".join(feed(answer, text, 2)) == "Sunny "
    ending = events(list(answer._ending(0, record(text), text, None, False, True)))
    assert ending[0]["choices"][0]["delta"]["content"] == "<tool"
    assert ending[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_answer_read_whole_gives_its_content_and_calls() -> None:
    """A job that ended before its stream was read (an Idempotency-Key replay): nothing
    was streamed, and the ending gives all of it."""
    answer = answer_for(tools=[WEATHER])
    ending = events(list(answer._ending(0, record(TEXT), "", None, False, True)))
    assert ending[0]["choices"][0]["delta"]["content"] == TEXT[: TEXT.index("<tool_call>")]
    assert ending[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert ending[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_named_call_opens_with_its_id_and_name_then_adds_arguments() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    answer = answer_for(tools=[WEATHER], tool_choice=choice)
    spec = answer.serving.job.spec
    named = forced_function(spec.tools or [], spec.tool_choice)
    assert named is not None
    chunks = [answer._arguments_chunk(0, named, piece, None) for piece in ('{"a"', ": 1}")]
    first, second = (e["choices"][0]["delta"]["tool_calls"][0] for e in events(chunks))
    assert first["id"].startswith("call_") and first["function"]["name"] == "get_weather"
    assert "id" not in second and second["function"] == {"arguments": ": 1}"}
    ending = events(list(answer._ending(0, record('{"a": 1}'), '{"a": 1}', named, False, False)))
    assert [e["choices"][0]["finish_reason"] for e in ending] == ["stop"]
