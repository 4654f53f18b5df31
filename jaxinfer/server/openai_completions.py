"""One /v1/completions or /v1/chat/completions call as a job: build its engine requests (every prompt
times `n`, all validated before any is queued), submit them, then either collect their results into
one body or stream them as server-sent events. Runs on the event loop and never blocks it.
"""

from __future__ import annotations

import asyncio
import json

from jaxinfer.server import openai_protocol as proto
from jaxinfer.server import openai_responses as out
from jaxinfer.server.http_errors import error_body, failure
from jaxinfer.server.orchestrator import RequestFailed, Ticket


async def events(tickets: list[Ticket]):
    """(index, event) of every ticket as events arrive, until all have ended; raises RequestFailed when
    one fails. The engine thread wakes the loop through `Ticket.on_change`."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify():
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop closed under a request that was ending anyway
            pass

    for ticket in tickets:
        ticket.on_change = notify
    live = list(range(len(tickets)))
    while live:
        wake.clear()
        for i in list(live):
            while (event := tickets[i].poll()) is not None:
                yield i, event
            if tickets[i].done:
                live.remove(i)
        if live:
            await wake.wait()


def sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


class Completions:
    """Makes the jobs; holds what they share (engine limits, token spellings, the model's name)."""

    def __init__(self, engine, orchestrator, builder, model_name: str):
        self.engine, self.orchestrator, self.builder, self.model_name = engine, orchestrator, builder, model_name
        self.spell = out.Spelling(engine.tokenizer)

    def completion(self, body: proto.CompletionRequest) -> CompletionJob:
        return CompletionJob(self, body)

    def chat(self, body: proto.ChatCompletionRequest) -> ChatJob:
        return ChatJob(self, body)


class _Job:
    prefix = ""

    def __init__(self, owner: Completions, body):
        self.owner, self.body = owner, body
        self.id = out.new_id(self.prefix)
        self.tickets: list[Ticket] = []

    def _prompts(self) -> list[dict]:
        """The `RequestBuilder.build` prompt arguments of each prompt."""
        raise NotImplementedError

    def _params(self) -> dict:
        raise NotImplementedError

    async def start(self):
        """Queues the engine requests; -> an SSE iterator when the body asks to stream, else None."""
        params, n = self._params(), self.body.n
        seeds = proto.choice_seeds(self.body.seed, n)
        prompts = self._prompts()
        requests = []
        for p, prompt in enumerate(prompts):
            where = f"prompt[{p}]: " if len(prompts) > 1 else ("prompt: " if "token_ids" in prompt else "")
            for j in range(n):
                choice = dict(params, seed=seeds[j]) if seeds[j] is not None else params
                requests.append(
                    self.owner.builder.build(f"{self.id}-{len(requests)}", **prompt, params=choice, where=where)
                )
        self.prompt_ids = [requests[p * n].prompt_ids for p in range(len(prompts))]
        try:
            for request in requests:
                self.tickets.append(self.owner.orchestrator.submit(request))
        except RequestFailed:
            self.cancel()
            raise
        return self._stream() if self.body.stream else None

    def cancel(self) -> None:
        """Ends the engine requests still running (no-op for finished ones): the client is gone or failed."""
        for ticket in self.tickets:
            self.owner.orchestrator.cancel(ticket)

    async def collect(self) -> dict:
        results = [None] * len(self.tickets)
        try:
            async for i, event in events(self.tickets):
                if event.result is not None:
                    results[i] = event.result
        finally:
            self.cancel()
        firsts = results[:: self.body.n]
        return self._whole(results, out.usage_of(results, firsts))

    async def _stream(self):
        n, include_usage = self.body.n, self.body.include_usage
        results = [None] * len(self.tickets)
        try:
            for head in self._heads():
                yield sse(head)
            async for i, event in events(self.tickets):
                results[i] = event.result
                yield sse(self._chunk(i, event))
            if include_usage:
                yield sse(self._usage_chunk(out.usage_of(results, results[::n])))
        except RequestFailed as e:
            error = failure(e)
            yield sse(error_body(error.status, str(error), error.param))
        yield sse("[DONE]")

    def _heads(self) -> list[dict]:
        return []

    def _chunk(self, index: int, event) -> dict:
        raise NotImplementedError

    def _usage_chunk(self, usage: dict) -> dict:
        raise NotImplementedError

    def _whole(self, results, usage: dict) -> dict:
        raise NotImplementedError


class CompletionJob(_Job):
    prefix = "cmpl"

    def _prompts(self) -> list[dict]:
        return [
            dict(text=p, text_field="prompt") if isinstance(p, str) else dict(token_ids=p) for p in self.body.prompt
        ]

    def _params(self) -> dict:
        if self.body.stream and self.body.echo and self.body.logprobs is not None:
            raise proto.ProtocolError("echo with logprobs is not supported when streaming", "echo")
        return self.body.engine_params()

    def _echo(self, p: int) -> str:
        prompt = self.body.prompt[p]
        return prompt if isinstance(prompt, str) else self.owner.engine.tokenizer.decode(prompt)

    def _whole(self, results, usage: dict) -> dict:
        body, choices = self.body, []
        for k, r in enumerate(results):
            p = k // body.n
            echo = self._echo(p) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                lp = out.CompletionLogprobs(self.owner.spell)
                parts = []
                if body.echo:
                    parts.append(lp.add(self.prompt_ids[p], r.prompt_logprobs, r.prompt_top_logprobs, True))
                    lp.offset = len(echo)
                parts.append(lp.add(r.token_ids, r.logprobs, r.top_logprobs))
                logprobs = out.merge_completion_logprobs(parts)
            choices.append(out.completion_choice(k, echo + r.text, logprobs, r.finish_reason))
        return out.completion(self.id, self.owner.model_name, choices, usage)

    def _heads(self) -> list[dict]:
        self.logprobs = [out.CompletionLogprobs(self.owner.spell) for _ in self.tickets]
        if not self.body.echo:
            return []
        heads = []
        for k in range(len(self.tickets)):
            echo = self._echo(k // self.body.n)
            self.logprobs[k].offset = len(echo)
            heads.append(self._wrap([out.completion_choice(k, echo, None, None)]))
        return heads

    def _chunk(self, index: int, event) -> dict:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = self.logprobs[index].add(event.token_ids, event.logprobs, event.top_logprobs)
        reason = event.result.finish_reason if event.result is not None else None
        return self._wrap([out.completion_choice(index, event.text, logprobs, reason)])

    def _wrap(self, choices: list[dict], usage=None) -> dict:
        return out.chunk(self.id, self.owner.model_name, "text_completion", choices, self.body.include_usage, usage)

    def _usage_chunk(self, usage: dict) -> dict:
        return self._wrap([], usage)


class ChatJob(_Job):
    prefix = "chatcmpl"

    def _prompts(self) -> list[dict]:
        return [dict(messages=self.body.conversation())]

    def _params(self) -> dict:
        return self.body.engine_params(self.owner.engine.config.max_context)

    def _logprobs(self, token_ids, logprobs, tops) -> dict | None:
        return out.chat_logprobs(self.owner.spell, token_ids, logprobs, tops) if self.body.logprobs else None

    def _whole(self, results, usage: dict) -> dict:
        choices = [
            out.chat_choice(k, r.text, self._logprobs(r.token_ids, r.logprobs, r.top_logprobs), r.finish_reason)
            for k, r in enumerate(results)
        ]
        return out.chat_completion(self.id, self.owner.model_name, choices, usage)

    def _heads(self) -> list[dict]:
        return [self._wrap([out.chat_delta(k, {"role": "assistant", "content": ""})]) for k in range(len(self.tickets))]

    def _chunk(self, index: int, event) -> dict:
        delta = {"content": event.text} if event.text or event.result is None else {}
        reason = event.result.finish_reason if event.result is not None else None
        logprobs = self._logprobs(event.token_ids, event.logprobs, event.top_logprobs)
        return self._wrap([out.chat_delta(index, delta, logprobs, reason)])

    def _wrap(self, choices: list[dict], usage=None) -> dict:
        return out.chunk(
            self.id, self.owner.model_name, "chat.completion.chunk", choices, self.body.include_usage, usage
        )

    def _usage_chunk(self, usage: dict) -> dict:
        return self._wrap([], usage)
