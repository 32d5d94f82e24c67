"""Redaction of secrets from text bound for a log or the database: private key blocks and AWS secret keys."""

from __future__ import annotations

import logging
import re

REDACTED_KEY = "[REDACTED PRIVATE KEY]"
# Left at the end of a text whose key block has not ended yet: the next chunk of the same stream continues it.
OPEN_KEY = "[REDACTED PRIVATE KEY (continues)]"
REDACTED_VALUE = "[REDACTED]"

_BEGIN = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
_END = r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
_KEY_BLOCK = re.compile(rf"{_BEGIN}.*?{_END}", re.DOTALL)
_KEY_UNTERMINATED = re.compile(rf"{_BEGIN}.*\Z", re.DOTALL)
_KEY_TAIL = re.compile(rf"\A.*?{_END}", re.DOTALL)
_END_LINE = re.compile(_END)
_KEY_BODY_LINE = re.compile(r"[A-Za-z0-9+/=]+")
_AWS_SECRET = re.compile(
    r"""(?P<name>aws_secret_access_key|secret_access_key|secretaccesskey)
        (?P<sep>["']?\s*[:=]\s*["']?)
        (?P<value>[A-Za-z0-9/+=]{16,})""",
    re.IGNORECASE | re.VERBOSE,
)


def redact(text: str) -> str:
    """Text with every private key block and AWS secret access key value replaced by a marker.

    A key block that begins but does not end in `text` is redacted to the end and marked with OPEN_KEY,
    so a streamed log can redact the rest with `redact_continuation`.
    """
    text = _KEY_BLOCK.sub(REDACTED_KEY, text)
    text = _KEY_UNTERMINATED.sub(OPEN_KEY, text)
    text = _redact_headless_keys(text)
    return _AWS_SECRET.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED_VALUE}", text)


def _redact_headless_keys(text: str) -> str:
    """A key block whose BEGIN line was cut off (the last lines of a command's output, say): the END line and the
    run of key-body lines right above it. Linear: each END is handled once, walking back line by line."""
    while (end := _END_LINE.search(text)) is not None:
        start = text.rfind("\n", 0, end.start()) + 1
        while start > 0:
            above = text.rfind("\n", 0, start - 1) + 1
            if not _KEY_BODY_LINE.fullmatch(text[above : start - 1].strip()):
                break
            start = above
        text = text[:start] + REDACTED_KEY + text[end.end() :]
    return text


def redact_continuation(text: str) -> str:
    """Redact a chunk that continues an open key block: everything up to its END line, then `redact`.

    Returns "" when the block does not end in this chunk either (the stream stays open).
    """
    match = _KEY_TAIL.search(text)
    if match is None:
        return ""
    return redact(text[match.end() :])


def ends_open(text: str) -> bool:
    """Whether redacted text ends inside a private key block (its next chunk must be redacted as such)."""
    return text.endswith(OPEN_KEY)


def describe(exc: BaseException) -> str:
    """The exception as one message for a person, redacted: its text, after its type unless that says nothing."""
    text = str(exc) or type(exc).__name__
    return redact(text if isinstance(exc, RuntimeError | ValueError | OSError) else f"{type(exc).__name__}: {text}")


class LineRedactor:
    """Redacts a log that arrives line by line: a key block spanning lines becomes one marker line."""

    def __init__(self) -> None:
        self._in_key = False

    def __call__(self, line: str) -> str | None:
        """The line to show, or None while inside a private key block."""
        if self._in_key:
            if re.search(_END, line):
                self._in_key = False
                rest = redact(line[re.search(_END, line).end() :])
                return rest or None
            return None
        redacted = redact(line)
        if ends_open(redacted):
            self._in_key = True
            return redacted.removesuffix(OPEN_KEY) + REDACTED_KEY
        return redacted


class RedactingFilter(logging.Filter):
    """The second net behind the redaction kiln does before anything leaves a stage: every record's message and
    traceback text, redacted before a handler formats it (Prefect's API handler included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: the handler reports it as it would have
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            formatted = logging.Formatter().formatException(record.exc_info)
            if redact(formatted) != formatted:
                record.exc_text = redact(formatted)
        return True


LOG_FILTER = RedactingFilter()


def redact_logs(*prefixes: str) -> None:
    """Put the redacting filter on the root logger's handlers and on every logger named with one of `prefixes`
    (and its handlers): Prefect's run loggers send to the API through their own handlers, not the root's."""
    manager = logging.Logger.manager
    names = [name for name in list(manager.loggerDict) if name.split(".")[0] in prefixes]
    for logger in [logging.getLogger(), *(logging.getLogger(name) for name in {*prefixes, *names})]:
        if LOG_FILTER not in logger.filters:
            logger.addFilter(LOG_FILTER)
        for handler in logger.handlers:
            if LOG_FILTER not in handler.filters:
                handler.addFilter(LOG_FILTER)
