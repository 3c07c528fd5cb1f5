"""What a post's identifiers may look like, in one place: its id (which names blob keys, file paths, ledger rows
and API routes) and its permalink (a path on reddit.com). Ingest checks both before it builds anything from
them; the API checks ids against the same pattern."""

from __future__ import annotations

import hashlib
import re

from pipeline.errors import InvalidRequest

POST_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
POST_ID_RULE = "letters, digits, '_' and '-' only, 1 to 64 of them"
_POST_ID = re.compile(POST_ID_PATTERN)
# a reddit path: /r/<subreddit>/comments/<id>/<slug>/; only URL-safe characters, so it can't leave the path
_PERMALINK = re.compile(r"/r/[A-Za-z0-9_]{1,64}/comments/[A-Za-z0-9]{1,16}(/[A-Za-z0-9_-]{0,300})?/?")
REDDIT = "https://www.reddit.com"


def is_post_id(value: object) -> bool:
    """Whether ``value`` is a post id as the stores key them (the whole string: a trailing newline fails)."""
    return isinstance(value, str) and _POST_ID.fullmatch(value) is not None


def check_post_id(value: str) -> str:
    """``value`` if it is a valid post id, else InvalidRequest saying what one looks like."""
    if not is_post_id(value):
        raise InvalidRequest(f"post_id: {POST_ID_RULE}")
    return value


def describe_bad_id(value: object) -> str:
    """Why ``value`` is no post id, safe to log and store: bounded, escaped, never the raw bytes."""
    text = value if isinstance(value, str) else repr(value)
    shown = ascii(text[:40]) + ("..." if len(text) > 40 else "")
    return f"post id {shown} ({len(text)} characters) refused: {POST_ID_RULE}"


def refused_key(value: object) -> str:
    """A ledger key for an entry whose id was refused: stable across runs (so a re-run records the same row),
    and outside the id pattern (``:``), so it never names or collides with a real post."""
    raw = value if isinstance(value, str) else repr(value)
    return "refused-id:" + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def reddit_path(permalink: object) -> str | None:
    """A permalink as the path on reddit.com it must be (``/r/...``), or None when it is anything else
    (``javascript:``, another site, a path that leaves ``/r/``). A full ``https://www.reddit.com/r/...`` URL is
    taken as its path."""
    if not isinstance(permalink, str):
        return None
    for prefix in (REDDIT, "https://reddit.com", "https://old.reddit.com"):
        if permalink.startswith(prefix + "/"):
            permalink = permalink[len(prefix):]
            break
    return permalink if _PERMALINK.fullmatch(permalink) else None
