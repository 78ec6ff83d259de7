"""OpenAI answer shapes: choices (text, message, tool calls), log-probabilities, stream chunks.

A `ChoiceBuilder` follows one choice (one `index`) as the engine's events arrive. It turns them
into the pieces a stream sends (`delta`s for chat, `text` for completions, tool calls as OpenAI
streams them: id and name first, then the arguments) and, at the end, into the whole choice of a
non-streamed answer. The tool-call syntax is read by the parser the request's tool format gives
(api/tools.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from forged.api.tools import ContentParser, OutputParser, ToolCall
from forged.engine.base import TokenEvent, TokenLogprob

Kind = Literal["completion", "chat"]


@dataclass
class ChoiceBuilder:
    index: int
    kind: Kind
    parser: OutputParser = field(default_factory=ContentParser)
    want_logprobs: bool = False
    echo: str = ""  # completions with echo: the prompt's text comes first
    content: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    _offset: int = 0  # completions' text_offset of the next token

    def __post_init__(self) -> None:
        self._offset = len(self.echo)

    # ------------------------------------------------------------ streaming

    def opening(self, token_ids: bool = False) -> list[dict[str, Any]]:
        """What a stream sends for this choice before any token: the role (chat), the echo (completions)."""
        if self.kind == "chat":
            chunks = [self._chunk({"role": "assistant", "content": ""})]
        else:
            chunks = [self._chunk(self.echo)] if self.echo else []
        for chunk in chunks if token_ids else ():
            chunk["token_ids"] = []
        return chunks

    def feed(self, event: TokenEvent, token_ids: bool = False) -> list[dict[str, Any]]:
        """The stream choices for one event (the finish, when it is the last, included). With
        `token_ids` every chunk carries them: the event's in its first chunk."""
        self.token_ids.extend(event.token_ids)
        self.logprobs.extend(event.logprobs)
        content, calls = self.parser.feed(event.text)
        chunks = self._pieces(content, calls)
        if event.finish_reason is not None:
            content, calls = self.parser.finish()
            chunks += self._pieces(content, calls)
            self.finish_reason = self._finish_reason(event.finish_reason)
        extra: dict[str, Any] = {}
        if self.want_logprobs and event.logprobs:
            extra["logprobs"] = self._logprobs(list(event.logprobs))
        if token_ids and event.token_ids:
            extra["token_ids"] = list(event.token_ids)
        if extra and not chunks:
            chunks = [self._chunk({} if self.kind == "chat" else "")]
        if extra:
            chunks[0].update(extra)
        if self.finish_reason is not None:
            if self.kind == "chat" or not chunks:
                chunks.append(self._chunk({} if self.kind == "chat" else "", self.finish_reason))
            else:
                chunks[-1]["finish_reason"] = self.finish_reason
        for chunk in chunks if token_ids else ():
            chunk.setdefault("token_ids", [])
        return chunks

    def _pieces(self, content: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
        out = []
        if content:
            self.content.append(content)
            out.append(self._chunk({"content": content} if self.kind == "chat" else content))
        for call in calls:
            k = len(self.calls)
            self.calls.append(call)
            # OpenAI's order: the call's id, type and name with empty arguments, then the arguments.
            out.append(self._chunk({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                                    "function": {"name": call.name, "arguments": ""}}]}))
            out.append(self._chunk({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]}))
        return out

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": self.index, "text": delta, "logprobs": None, "finish_reason": finish}

    # ------------------------------------------------------------ whole answers

    def collect(self, event: TokenEvent) -> None:
        """A non-streamed answer's events, kept until `choice()`."""
        self.feed(event)

    def choice(self, token_ids: bool = False) -> dict[str, Any]:
        logprobs = self._logprobs(self.logprobs, whole=True) if self.want_logprobs else None
        text = "".join(self.content)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text or (None if self.calls else "")}
            if self.calls:
                message["tool_calls"] = [c.openai() for c in self.calls]
            out: dict[str, Any] = {"index": self.index, "message": message, "logprobs": logprobs,
                                   "finish_reason": self.finish_reason}
        else:
            out = {"index": self.index, "text": self.echo + text, "logprobs": logprobs,
                   "finish_reason": self.finish_reason}
        if token_ids:
            out["token_ids"] = self.token_ids
        return out

    # ------------------------------------------------------------ internals

    def _finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason

    def _logprobs(self, entries: list[TokenLogprob], whole: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": [_chat_logprob(e) for e in entries], "refusal": None}
        tokens, offsets = [], []
        offset = len(self.echo) if whole else self._offset
        for e in entries:
            text = _text(e.piece)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        if not whole:
            self._offset = offset
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{_text(e.piece): e.logprob, **{_text(p): lp for _, p, lp in e.top}}
                                 for e in entries],
                "text_offset": offsets}


def _text(piece: bytes) -> str:
    # A token may hold part of a UTF-8 character: its bytes say exactly what it holds.
    return piece.decode("utf-8", "replace")


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": _text(entry.piece), "logprob": entry.logprob, "bytes": list(entry.piece),
            "top_logprobs": [{"token": _text(p), "logprob": lp, "bytes": list(p)} for _, p, lp in entry.top]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage: the prompt once, the completion tokens of every choice, and the prompt tokens
    served from the prefix cache (their KV was reused)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
