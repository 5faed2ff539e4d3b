"""Quoting what a caller sent inside a message sent back to it: a short prefix, never the whole value.

A refusal that echoes its input without bound can outgrow what the transport carries (gRPC sends a
status message in HTTP/2 trailers, which peers cap at a few KiB: a 600 KB echo never arrives and the
caller's channel hangs) and turns every error path into an amplifier. So every message that quotes
caller input quotes it through :func:`quote`, and :func:`bounded` caps a whole message as the last
line of defence. Standard library only, so every part may use it.
"""

from __future__ import annotations

#: the most characters of a caller's value quoted in a message
QUOTE_CHARS = 48
#: the most characters of any message sent back to a caller
MESSAGE_CHARS = 1024


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of at most ``limit`` characters of ``value`` (as text); a longer value is cut and says how
    long it was: ``'abc…' (600000 chars)``."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} chars)"


def bounded(message: str, limit: int = MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters (with a mark that it was cut)."""
    if len(message) <= limit:
        return message
    return message[: limit - 14] + " …(truncated)"
