"""Pagination of every List RPC, as Google's API design guide defines it (https://google.aip.dev/158).

A request carries ``page_size`` (0: :data:`DEFAULT_PAGE_SIZE`; more than :data:`MAX_PAGE_SIZE` is treated
as that maximum; negative: INVALID_ARGUMENT) and ``page_token`` (empty: the first page). A response
carries ``next_page_token``, empty on the last page. A page may hold fewer items than asked: it stops
before its serialized size would pass :data:`PAGE_BYTES`, so no listing can outgrow a reply however
large its rows are (every row's fields are bounded at the door).

Tokens are opaque to clients: URL-safe base64 of a small JSON object naming the listing, a digest of
the request's other fields (a token is valid only with the same filters) and the sort key of the last
item returned. Listings are ordered by a unique, immutable key (round id, version number, ...), so a
page boundary never skips or repeats an item while rows are added meanwhile.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coldswarm.coordinator.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: a page's items, serialized, stop before this many bytes (the server's send limit is above 1 MiB)
PAGE_BYTES = 512 * 1024


@dataclass(frozen=True)
class PageRequest:
    size: int  # items to return at most
    after: Any  # the sort key of the last item already returned; None for the first page
    listing: str
    filters: str  # digest of the request's other fields

    def token_for(self, key: Any) -> str:
        data = json.dumps({"l": self.listing, "f": self.filters, "a": key}, separators=(",", ":"))
        return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def _digest(filters: dict) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True).encode()).hexdigest()[:16]


def page_request(listing: str, page_size: int, page_token: str, **filters) -> PageRequest:
    """Read a request's paging fields; ``filters`` are its other fields (a token must come with the same)."""
    if page_size < 0:
        raise InvalidArgument(f"page_size is {page_size}; it must not be negative (0: the default)")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    digest = _digest(filters)
    if not page_token:
        return PageRequest(size, None, listing, digest)
    bad = InvalidArgument(
        "page_token is not one this listing returned with these request fields: pass next_page_token from "
        "the previous page unchanged, with the same other fields, or none for the first page"
    )
    try:
        data = json.loads(base64.urlsafe_b64decode(page_token + "=" * (-len(page_token) % 4)))
    except (ValueError, TypeError):
        raise bad from None
    if not isinstance(data, dict) or data.get("l") != listing or data.get("f") != digest or "a" not in data:
        raise bad
    return PageRequest(size, data["a"], listing, digest)


def fill_page(
    rows: Iterable[Any], to_message: Callable[[Any], Any], key: Callable[[Any], Any], request: PageRequest
) -> tuple[list[Any], str]:
    """Messages for at most ``request.size`` of ``rows`` (fetched with one extra, in key order), stopping
    before :data:`PAGE_BYTES`; returns (messages, next_page_token)."""
    out, used, last = [], 0, None
    rows = list(rows)
    for i, row in enumerate(rows):
        if len(out) == request.size:
            break
        msg = to_message(row)
        size = msg.ByteSize() + 8  # with its tag and length
        if out and used + size > PAGE_BYTES:
            break
        out.append(msg)
        used += size
        last = row
        if i == len(rows) - 1:
            return out, ""
    if last is None:
        return out, ""
    return out, request.token_for(key(last))
