"""Secret scrubbing: API keys and tokens from the environment never reach the archive, a prompt or the terminal.

An LLM (or the code it writes) can echo a key back: a hosted endpoint sees it in the Authorization header, and a
program can print whatever it finds. So every text on its way out passes through `scrub`, which replaces each
secret value with `[redacted $NAME]`.

Secrets are the values of
- the variables named with `register(names)` (the config's `llm.*.api_key_env`), and
- the values given to `register_value` (the device agent's token, read from target.token_file), and
- every variable whose name has a word (split at `_`, `-`, `.`) ending in KEY, TOKEN, SECRET, PASSWORD, PASSWD,
  CREDENTIAL, AUTH, SESSION or COOKIE (an S may follow): OPENAI_API_KEY, HF_TOKEN, APIKEY, OAUTH_CLIENT.
  Whole words keep KEYBOARD, KEYRING, AUTHOR and XAUTHORITY out.

A value counts only if it has at least MIN_LENGTH characters, is not a flag word such as 'disabled', and is not a
path that exists (SSH_AUTH_SOCK, XAUTHORITY-like names): replacing short or common strings would mangle every text
for nothing. Values are read from os.environ on first use and again at each `register` call.

Texts are often clipped (diagnostics, output tails) before they reach us, possibly inside a secret: a piece of at
least MIN_LENGTH characters that ends a text as a secret's start, or starts it as a secret's end, is replaced too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MIN_LENGTH = 8
NAME_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "SESSION", "COOKIE")
NOT_SECRETS = {"true", "false", "enabled", "disabled", "none", "null", "undefined"}

_NAME = re.compile(rf"(?:^|[_.\-])[A-Z0-9]*(?:{'|'.join(NAME_WORDS)})S?(?:$|[_.\-])", re.IGNORECASE)
_registered: list[str] = []
_values: dict[str, str] = {}  # secrets that live in files, not the environment (target.token_file): label -> value
_table: tuple[re.Pattern | None, dict[str, str]] | None = None  # (pattern, text form -> marker), built lazily


def looks_secret(name: str) -> bool:
    """Whether a variable name says it holds a credential."""
    return _NAME.search(name) is not None


def _counts(value: str) -> bool:
    return len(value) >= MIN_LENGTH and value.strip().lower() not in NOT_SECRETS and not os.path.exists(value)


def _forms(value: str) -> set[str]:
    """The value as it appears raw, inside JSON strings (both ASCII modes) and in URLs."""
    return {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], quote(value, safe=""),
            quote_plus(value)}


def _build() -> tuple[re.Pattern | None, dict[str, str]]:
    names = [*_registered, *sorted(n for n in os.environ if looks_secret(n))]  # registered names win a shared value
    markers: dict[str, str] = {}
    for label, value in _values.items():
        if _counts(value):
            for form in _forms(value):
                markers.setdefault(form, f"[redacted {label}]")
    for name in names:
        value = os.environ.get(name)
        if value and _counts(value):
            for form in _forms(value):
                markers.setdefault(form, f"[redacted ${name}]")
    if not markers:
        return None, markers
    # longest first: a secret that contains another is replaced whole, not around the shorter one
    return re.compile("|".join(map(re.escape, sorted(markers, key=len, reverse=True)))), markers


def _current() -> tuple[re.Pattern | None, dict[str, str]]:
    global _table
    if _table is None:
        _table = _build()
    return _table


def register(names: Iterable[str | None] = ()) -> None:
    """Treat these variables as secrets whatever their names, and re-read the environment."""
    global _table
    _registered.extend(n for n in names if n and n not in _registered)
    _table = None


def register_value(label: str, value: str) -> None:
    """Treat a secret read from a file as one too; `label` names it in the marker (never the value)."""
    _values[label] = value
    global _table
    _table = None


def active() -> bool:
    """Whether any secret is known: callers may skip work when there is none."""
    return _current()[0] is not None


def _clipped(text: str, form: str, marker: str) -> str:
    """Replace a piece of `form` cut off by the end or the start of `text`."""
    i = text.find(form[:MIN_LENGTH], max(0, len(text) - len(form) + 1))
    while i != -1:
        if form.startswith(text[i:]):
            text = text[:i] + marker
            break
        i = text.find(form[:MIN_LENGTH], i + 1)
    j = text.rfind(form[-MIN_LENGTH:], 0, len(form) - 1)
    while j != -1:
        if form.endswith(text[:j + MIN_LENGTH]):
            return marker + text[j + MIN_LENGTH:]
        j = text.rfind(form[-MIN_LENGTH:], 0, j + MIN_LENGTH - 1)
    return text


def scrub(text: str) -> str:
    """`text` with every secret value replaced by `[redacted $NAME]`; the same string when there is none."""
    pattern, markers = _current()
    if pattern is None or not text:
        return text
    text = pattern.sub(lambda m: markers[m.group(0)], text)
    for form, marker in markers.items():
        text = _clipped(text, form, marker)
    return text


def scrub_data(obj):
    """Scrub every string inside dicts, lists and tuples (keys too); other values are returned as they are."""
    if not active():
        return obj
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {scrub_data(k): scrub_data(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_data(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(scrub_data(v) for v in obj)
    return obj
