"""Keep request content (prompts, keys) out of the log unless debug logging is on.

forged's own request path logs no request content: handlers log nothing per request, rejections are
answered and not logged, the engine logs request ids and counts. The one place that did is aiohttp:
when its parser rejects a malformed request it logs the parser's exception, whose text quotes the
bytes it choked on, which can be part of a body. This filter keeps only the exception's type and
status there, unless the daemon runs at `logging.level: debug`.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

AIOHTTP_SERVER_LOGGER = "aiohttp.server"


class WithoutRequestBytes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            record.msg = f"{record.getMessage()}: {type(exc).__name__} (HTTP {exc.code}); " \
                         f"logging.level debug shows the bytes it quotes"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    logger = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    if not any(isinstance(f, WithoutRequestBytes) for f in logger.filters):
        logger.addFilter(WithoutRequestBytes())
