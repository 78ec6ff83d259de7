"""Turning token bytes into streamed text: incremental UTF-8 and stop strings.

A token's piece can end in the middle of a multi-byte UTF-8 character (emoji, CJK); the next
token completes it. And a stop string can straddle tokens. Both mean some text must be held back
until the following token decides it.

Both engines stream through this: llama_cpp turns each token's bytes into text with `StreamDecoder`;
TensorRT-LLM hands over text already decoded. Both cut stop strings with `StopMatcher`, so a stop
string is cut the same way whichever engine runs.
"""

from __future__ import annotations

import codecs


class StreamDecoder:
    """Bytes in, complete characters out. Invalid sequences become U+FFFD, never an exception."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Holds back any tail that could still become a stop string.

    `feed` returns (text safe to emit, stopped). Once stopped, the text up to (not including) the
    stop string has been emitted and the rest is dropped, as OpenAI does.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        first = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self._held = ""
            return buf[:first], True
        keep = self._longest_partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_partial_suffix(self, buf: str) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
