"""Streaming text assembly: UTF-8 split across tokens, and stop strings split across tokens."""

from __future__ import annotations

from forged.engine.text import StopMatcher, StreamDecoder


def test_multibyte_character_split_across_pieces() -> None:
    data = "海🌊é".encode()
    decoder = StreamDecoder()
    out = [decoder.feed(data[i:i + 1]) for i in range(len(data))]
    assert "".join(out) + decoder.flush() == "海🌊é"
    # Nothing is emitted until a character is complete.
    assert out[:2] == ["", ""] and out[2] == "海"


def test_invalid_bytes_become_replacement_not_an_exception() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b"a\xffb") == "a\ufffdb"
    assert decoder.feed(b"\xe6") == ""
    assert decoder.flush() == "\ufffd"


def test_stop_string_across_pieces_is_held_back_then_dropped() -> None:
    stop = StopMatcher(("END",))
    assert stop.feed("hello E") == ("hello ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("D and more") == ("", True)


def test_false_start_of_a_stop_string_is_released() -> None:
    stop = StopMatcher(("END",))
    assert stop.feed("ab E") == ("ab ", False)
    assert stop.feed("x") == ("Ex", False)
    assert stop.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    stop = StopMatcher(("two", "one"))
    assert stop.feed("zero one two") == ("zero ", True)


def test_no_stops_passes_through() -> None:
    stop = StopMatcher(())
    assert stop.feed("anything END") == ("anything END", False)
