"""OpenAI's `POST /v1/chat/completions` and `POST /v1/completions`, served as generation jobs.

Each request becomes a generation job like any other (quota, rate limit, Idempotency-Key,
audit, the queue, the decode group it shares with other jobs on its model), and the answer
is built from what the job recorded:

- without `stream`, the request waits for the job to end and answers the completion object;
- with `stream: true`, it answers server-sent events in OpenAI's chunk format, the text as
  the worker decodes it (the job's token stream), then the finish reasons, the usage when
  `stream_options.include_usage` asks for it, and `data: [DONE]`.

Log probabilities, where asked, come with the text: each chunk carries the entries of the
tokens whose text it completes (the token stream's deltas hold them), the whole answer
those the job stored with its text. A job that does not store its text (`store: false`)
does not store them either: its answer takes them from the token stream like its text.

A client that goes away before its answer cancels its job, unless it sent an
Idempotency-Key: then the job finishes and a retry with the same key gets the answer. A
streamed answer whose worker is lost after it gave out text ends with an error event (the
text already sent cannot be taken back); the job itself runs again, so a retry with the
same Idempotency-Key gets the finished answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.auth import Principal
from api.deps import (
    JobsWrite,
    PublisherDep,
    SettingsDep,
    TokenReaderDep,
    in_create_slot,
    request_session,
)
from api.errors import error_body
from api.job_follow import (
    ClientDisconnected,
    Done,
    Follower,
    FollowEvent,
    JobState,
    Quiet,
    Requeued,
    Restart,
    Token,
    ending_error,
    follow_to_end,
)
from api.routes.jobs import REPLAYED_HEADER, IdempotencyKey, cancel_in, create_job_in
from api.serving_requests import (
    ChatCompletionBody,
    CompletionBody,
    ServingRequest,
    chat_request,
    completion_request,
    json_body,
    openai_param,
    request_body_doc,
)
from core.completions import (
    LOGPROBS,
    choice_index,
    chunk_object,
    completion_object,
    echoed,
    logprob_entries,
    usage_chunk,
)
from core.dispatch import JobPublisher
from core.enums import JobStatus
from core.errors import (
    BadRequestError,
    ContextLengthExceededError,
    InvalidRequestError,
    JobFailedError,
    ModelNotFoundError,
    ModelNotInstalledError,
    ModelyardError,
)
from core.prompts import PromptError
from core.settings import Settings
from core.token_stream import TokenStreamReader
from core.tools import (
    TOOL_CALLS,
    Tool,
    answered_calls,
    answered_record,
    call_id,
    forced_function,
    sendable_content,
)
from db import outputs as outputs_repo
from db.outputs import TEXT_CHARS, OutputRecord

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])

JOB_ID_HEADER = "Modelyard-Job-Id"
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keepalive\n\n"


def _documented(body: type[BaseModel], answer: str) -> dict[str, Any]:
    return {
        "openapi_extra": request_body_doc(body),
        "responses": {
            200: {
                "description": f"{answer}; with `stream: true`, server-sent events of its "
                "chunks ending with `data: [DONE]`.",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        },
    }


@dataclass(frozen=True)
class Created:
    """The job a serving request created (or an earlier one with its Idempotency-Key)."""

    job_id: str
    state: JobState
    created: int  # unix seconds
    idempotent: bool  # the request carried an Idempotency-Key
    replayed: bool  # and an earlier request with it created the job


@router.post(
    "/chat/completions",
    response_class=Response,
    **_documented(ChatCompletionBody, "A chat.completion"),
)
async def create_chat_completion(
    request: Request,
    settings: SettingsDep,
    publisher: PublisherDep,
    reader: TokenReaderDep,
    who: JobsWrite,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """OpenAI's chat completions; the answer is a generation job (see `Modelyard-Job-Id`)."""
    serving = chat_request(
        await json_body(request), settings.chat_default_max_tokens, settings.serving_store_text
    )
    return await _serve(request, serving, settings, publisher, reader, who, idempotency_key)


@router.post(
    "/completions",
    response_class=Response,
    **_documented(CompletionBody, "A text_completion"),
)
async def create_completion(
    request: Request,
    settings: SettingsDep,
    publisher: PublisherDep,
    reader: TokenReaderDep,
    who: JobsWrite,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """OpenAI's (legacy) text completions; the answer is a generation job."""
    serving = completion_request(await json_body(request), settings.serving_store_text)
    return await _serve(request, serving, settings, publisher, reader, who, idempotency_key)


async def _serve(
    request: Request,
    serving: ServingRequest,
    settings: Settings,
    publisher: JobPublisher,
    reader: TokenStreamReader,
    who: Principal,
    idempotency_key: str | None,
) -> Response:
    created = await in_create_slot(
        request, _create, serving, settings, publisher, who, idempotency_key
    )
    completion_id = f"{'chatcmpl' if serving.chat else 'cmpl'}-{created.job_id}"
    headers = {JOB_ID_HEADER: created.job_id}
    if created.replayed:
        headers[REPLAYED_HEADER] = "true"
    answer = _Answer(serving, settings, publisher, who, created, completion_id)
    if serving.stream:
        headers["Cache-Control"] = "no-cache"
        return StreamingResponse(
            answer.stream(reader), media_type="text/event-stream", headers=headers
        )
    state: JobState | None = created.state
    if not created.state.terminal:
        stored = serving.job.spec.store_text
        follower = Follower(
            reader, settings.database_url, created.job_id, created.state.attempts, tokens=not stored
        )
        try:
            state = await follow_to_end(follower, request.is_disconnected, answer.take)
        except ClientDisconnected:
            await answer.abandon()
            return Response(status_code=499)
    body = await run_in_threadpool(answer.completion, state)
    return JSONResponse(body, headers=headers)


def _create(
    serving: ServingRequest,
    settings: Settings,
    publisher: JobPublisher,
    who: Principal,
    idempotency_key: str | None,
) -> Created:
    response = Response()
    with request_session(settings) as session:
        try:
            out = create_job_in(
                session, serving.job, response, settings, publisher, who, idempotency_key
            )
        except InvalidRequestError as exc:
            raise _as_serving_error(exc, serving.chat) from exc
    state = JobState(
        JobStatus(out.status),
        out.attempts,
        out.error.type if out.error else None,
        out.error.message if out.error else None,
    )
    created_at = int(out.created_at.timestamp())
    replayed = response.headers.get(REPLAYED_HEADER) == "true"
    return Created(out.id, state, created_at, idempotency_key is not None, replayed)


def _as_serving_error(exc: InvalidRequestError, chat: bool) -> ModelyardError:
    """A job-request refusal as OpenAI answers it: 404 for a model that is not there, 400
    naming the body field otherwise."""
    param = openai_param(exc.param, chat)
    if isinstance(exc, ModelNotInstalledError) or (
        exc.param == "spec.model" and "is not in the registry" in exc.message
    ):
        return ModelNotFoundError(exc.message, param="model")
    cause = exc.__cause__
    if isinstance(cause, PromptError) and cause.too_long:
        return ContextLengthExceededError(exc.message, param=param)
    return BadRequestError(exc.message, param=param)


class _Answer:
    """Everything one serving request answers from its job."""

    def __init__(
        self,
        serving: ServingRequest,
        settings: Settings,
        publisher: JobPublisher,
        who: Principal,
        created: Created,
        completion_id: str,
    ) -> None:
        self.serving = serving
        self.settings = settings
        self.publisher = publisher
        self.who = who
        self.created = created
        self.completion_id = completion_id
        self.streamed: dict[int, str] = {}  # choice index -> text the token stream gave
        self.streamed_logprobs: dict[int, list[dict[str, Any]]] = {}  # and its entries
        self.offsets: dict[int, int] = {}  # choice index -> legacy text_offset of its next entry
        self.opened: set[int] = set()  # choices whose named call's first chunk was sent
        self.content_sent: dict[int, int] = {}  # choice -> characters of an auto answer sent

    def take(self, event: FollowEvent) -> None:
        """Assemble the text (and log probabilities) of a job that does not store it from
        its token stream."""
        if isinstance(event, Token):
            index = self._index(event.prompt_index, event.sequence_index)
            self.streamed[index] = self.streamed.get(index, "") + event.text
            if event.logprobs is not None:
                self.streamed_logprobs.setdefault(index, []).extend(event.logprobs)
        elif isinstance(event, Restart):
            self.streamed.clear()
            self.streamed_logprobs.clear()

    def _index(self, prompt_index: int, sequence_index: int) -> int:
        return choice_index(prompt_index, sequence_index, self.serving.choices_per_prompt)

    def _streamed_text(self, text: OutputRecord) -> str:
        """A stored text, or the streamed one of a text not stored, which must be whole."""
        if text.data is None or TEXT_CHARS not in text.data:
            return text.text
        streamed = self.streamed.get(self._index(text.prompt_index, text.sequence_index), "")
        if len(streamed) != text.data[TEXT_CHARS]:
            raise JobFailedError(
                f"job {self.job_id} did not store its text (store: false) and its token stream "
                "was not read whole; the answer cannot be given again"
            )
        return streamed

    def _whole(self, text: OutputRecord) -> OutputRecord:
        """A finished text with its text and log probabilities, stored or streamed."""
        whole = replace(text, text=self._streamed_text(text))
        if self.serving.job.spec.logprobs and logprob_entries(whole) is None:
            entries = self.streamed_logprobs.get(
                self._index(text.prompt_index, text.sequence_index)
            )
            whole = replace(whole, data={**(whole.data or {}), LOGPROBS: entries or []})
        return whole

    def _logprob_chunk(
        self, index: int, text: str | None, entries: list[dict[str, Any]] | None
    ) -> bytes:
        """A chunk of text with its tokens' entries; moves the choice's text_offset on."""
        offset = self.offsets.get(index, 0)
        if entries:
            self.offsets[index] = offset + sum(len(e["token"]) for e in entries)
        return self._chunk(index, text=text, logprobs=entries, text_offset=offset)

    def _ending(
        self,
        index: int,
        whole: OutputRecord,
        given: str,
        named: Tool | None,
        whole_calls: bool,
        auto: bool,
    ) -> Iterator[bytes]:
        """A choice's last chunks, once its text is whole: what the stream has not given
        yet (text, a named call's last arguments, the calls of required or auto) and its
        finish reason."""
        entries = logprob_entries(whole)
        answered = self._called(whole)
        calls = (answered.data or {}).get(TOOL_CALLS)
        if whole_calls or auto:
            if auto:  # the content the stream held back, up to the calls (or all of it)
                upto = sendable_content(whole.text) if calls else len(whole.text)
                piece = self._content_piece(index, whole.text, upto)
                if piece:
                    yield self._chunk(index, text=piece)
            if calls:
                deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                yield self._chunk(index, tool_calls=deltas, logprobs=entries)
            elif whole_calls:
                yield self._chunk(index, text=whole.text, logprobs=entries)
            elif entries:
                yield self._chunk(index, logprobs=entries)
            yield self._chunk(index, finish_reason=answered.finish_reason)
            return
        left = entries[len(self.streamed_logprobs.get(index, [])) :] if entries else None
        rest = whole.text[len(given) :]
        if named is not None:
            if rest or left or index not in self.opened:
                yield self._arguments_chunk(index, named, rest, left or None)
        elif rest or left:
            yield self._logprob_chunk(index, rest, left or None)
        yield self._chunk(index, finish_reason=answered.finish_reason)

    def _content_piece(self, index: int, text: str, upto: int) -> str:
        """An auto answer's `text` (as streamed so far, or whole) from where its content
        stream stands to `upto`."""
        done = self.content_sent.get(index, 0)
        if upto <= done:
            return ""
        self.content_sent[index] = upto
        return text[done:upto]

    def _arguments_chunk(
        self, index: int, function: Tool, text: str, entries: list[dict[str, Any]] | None
    ) -> bytes:
        """A named function's call, streamed as its arguments are decoded: the first chunk
        of a choice opens the call (its id and name), the others add to its arguments."""
        part: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
        if index not in self.opened:
            self.opened.add(index)
            part = {
                "index": 0,
                "id": call_id(self.completion_id, index, 0),
                "type": "function",
                "function": {"name": function.function.name, "arguments": text},
            }
        return self._chunk(index, tool_calls=[part], logprobs=entries)

    @property
    def job_id(self) -> str:
        return self.created.job_id

    def _outputs(self) -> list[OutputRecord]:
        with request_session(self.settings) as session:
            return [
                OutputRecord(
                    prompt_index=o.prompt_index,
                    sequence_index=o.sequence_index,
                    text=o.text,
                    finish_reason=o.finish_reason,
                    prompt_tokens=o.prompt_tokens,
                    completion_tokens=o.completion_tokens,
                    data=o.data,
                )
                for o in outputs_repo.list_outputs(session, self.job_id)
            ]

    def _final(self, state: JobState | None) -> list[OutputRecord]:
        """The job's texts when it succeeded; the error its end means otherwise."""
        if state is None or state.status is not JobStatus.SUCCEEDED:
            raise ending_error(self.job_id, state, None)
        return self._outputs()

    def _echoed(self, text: OutputRecord) -> OutputRecord:
        """`echo`: the prompt (and its tokens' entries) put before the completion."""
        prompts = self.serving.job.spec.prompts
        prompt = prompts[text.prompt_index] if prompts is not None else None
        echo_text, data = echoed(text.text, text.data, prompt)
        return replace(text, text=echo_text, data=data)

    def _called(self, text: OutputRecord) -> OutputRecord:
        """A text that made tool calls as its content and calls (`data.tool_calls`)."""
        spec = self.serving.job.spec
        if spec.tools is None:
            return text
        index = self._index(text.prompt_index, text.sequence_index)
        answer = answered_calls(
            text.text, text.finish_reason, spec.tools, spec.tool_choice, self.completion_id, index
        )
        return text if answer is None else answered_record(text, answer)

    def completion(self, state: JobState | None) -> dict[str, Any]:
        texts = [self._called(self._whole(t)) for t in self._final(state)]
        if self.serving.echo:
            texts = [self._echoed(t) for t in texts]
        return completion_object(
            chat=self.serving.chat,
            completion_id=self.completion_id,
            model=self.serving.model,
            created=self.created.created,
            texts=texts,
            per_prompt=self.serving.choices_per_prompt,
        )

    def _chunk(self, index: int, **parts: Any) -> bytes:
        data = chunk_object(
            chat=self.serving.chat,
            completion_id=self.completion_id,
            model=self.serving.model,
            created=self.created.created,
            index=index,
            **parts,
        )
        return _event(data)

    @staticmethod
    def _error(exc: ModelyardError) -> bytes:
        data = error_body(exc.type, exc.message, exc.param)
        return _event(data)

    async def stream(self, reader: TokenStreamReader) -> AsyncIterator[bytes]:
        """The chunks of the answer; a client that leaves early cancels the job (unless
        it sent an Idempotency-Key)."""
        finished = False
        try:
            async for piece in self._pieces(reader):
                yield piece
            finished = True
        finally:
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self.abandon()

    async def _pieces(self, reader: TokenStreamReader) -> AsyncIterator[bytes]:
        choices = self.serving.prompts * self.serving.choices_per_prompt
        if self.serving.chat:
            for index in range(choices):
                yield self._chunk(index, role=True)
        sent = self.streamed
        spec = self.serving.job.spec
        named = forced_function(spec.tools or [], spec.tool_choice)
        whole_calls = spec.calls_tools and named is None  # required: given once they parse
        auto = spec.tool_choice == "auto"  # with tools: the spec needs them for a choice
        state: JobState | None = self.created.state
        if state is not None and not state.terminal:
            follower = Follower(reader, self.settings.database_url, self.job_id, state.attempts)
            async for event in follower.run():
                if isinstance(event, Token):
                    self.take(event)
                    index = self._index(event.prompt_index, event.sequence_index)
                    if whole_calls:
                        continue
                    if named is not None:
                        yield self._arguments_chunk(index, named, event.text, event.logprobs)
                    elif auto:
                        so_far = sent[index]
                        piece = self._content_piece(index, so_far, sendable_content(so_far))
                        if piece:
                            yield self._chunk(index, text=piece)
                    else:
                        yield self._logprob_chunk(index, event.text, event.logprobs)
                elif isinstance(event, Restart | Requeued):
                    if whole_calls or (auto and not self.content_sent):
                        # nothing sent yet: the next attempt's text is taken anew
                        self.streamed.clear()
                        self.streamed_logprobs.clear()
                    elif sent:
                        yield self._error(_worker_lost(self.job_id))
                        return
                elif isinstance(event, Quiet):
                    yield KEEPALIVE
                elif isinstance(event, Done):
                    state = event.state
        try:
            texts = await run_in_threadpool(self._final, state)
        except ModelyardError as exc:
            yield self._error(exc)
            return
        for text in sorted(texts, key=lambda t: (t.prompt_index, t.sequence_index)):
            index = self._index(text.prompt_index, text.sequence_index)
            given = sent.get(index, "")
            try:
                whole = self._whole(text)
            except JobFailedError as exc:
                yield self._error(exc)
                return
            if not whole.text.startswith(given):
                yield self._error(_worker_lost(self.job_id))
                return
            for chunk in self._ending(index, whole, given, named, whole_calls, auto):
                yield chunk
        if self.serving.include_usage:
            data = usage_chunk(
                chat=self.serving.chat,
                completion_id=self.completion_id,
                model=self.serving.model,
                created=self.created.created,
                texts=texts,
            )
            yield _event(data)
        yield DONE

    async def abandon(self) -> None:
        """The client left before its answer: cancel the job, unless the client may come
        back for it with its Idempotency-Key."""
        if self.created.idempotent:
            logger.info("job %s: client left; kept for its Idempotency-Key", self.job_id)
            return
        try:
            await run_in_threadpool(self._cancel)
        except Exception:
            logger.exception("job %s: could not cancel it after its client left", self.job_id)

    def _cancel(self) -> None:
        with request_session(self.settings) as session:
            job = cancel_in(session, self.publisher, self.who, self.job_id)
        logger.info("job %s: client left; cancel requested (now %s)", self.job_id, job.status)


def _event(data: dict[str, Any]) -> bytes:
    """One server-sent event whose data is `data` as compact JSON."""
    return format_sse_event(data_str=json.dumps(data, separators=(",", ":")))


def _worker_lost(job_id: str) -> JobFailedError:
    return JobFailedError(
        f"the worker decoding job {job_id} was lost after part of the answer was sent; the job "
        "runs again: retry with the same Idempotency-Key to get its finished answer",
        param=None,
    )
