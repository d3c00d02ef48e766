"""Code and JSON out of untidy LLM replies: fences with or without tags, prose around them, no fence at
all, several fences, replies cut off by the token limit."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(```|\Z)", re.S)  # the last group is empty when cut off
CODE_START = re.compile(r"^(import |from |class |def |@|#|[A-Za-z_][\w.]* *=)")
NET = re.compile(r"^class\s+Net\b", re.M)


@dataclass(frozen=True)
class Extracted:
    """The module in a reply. `truncated`: the reply stopped before the module ended, so `code` is what came, and
    it must not be evaluated: trimmed into something that parses it would be a different program."""

    code: str | None  # None: no code at all
    truncated: bool = False


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def _trim_to_parse(code: str, max_drop: int = 40) -> tuple[str | None, list[str]]:
    """(the longest head of `code` that parses and holds Net, the lines dropped), or (None, []) if none does."""
    lines = code.rstrip().splitlines()
    for drop in range(min(max_drop, len(lines))):
        attempt = "\n".join(lines[: len(lines) - drop])
        if _parses(attempt) and NET.search(attempt):
            return attempt + "\n", lines[len(lines) - drop :]
    return None, []


def _is_code(line: str) -> bool:
    return line[:1].isspace() or bool(CODE_START.match(line)) or line.rstrip().endswith(("(", "[", "{", ",", "\\"))


def _complete(code: str, closed: bool, cut_off: bool) -> Extracted:
    """A closed fence ended the module. Otherwise the reply ended in it: prose after the code is dropped, but a
    tail that is still code (or a reply the backend says hit the token limit) means the module was cut off."""
    if closed:
        return Extracted(code.rstrip() + "\n")
    trimmed, dropped = _trim_to_parse(code)
    tail = next((line for line in dropped if line.strip()), None)
    if trimmed is not None and tail is not None and not _is_code(tail):
        return Extracted(trimmed)
    if cut_off or tail is not None:
        return Extracted(code.rstrip() + "\n", truncated=True)
    return Extracted(trimmed or code.rstrip() + "\n")  # unparseable: the evaluator reports the syntax error


def extract_code(reply: str, cut_off: bool = False) -> Extracted:
    """The module in a reply (code None: an outcome of kind `no_code`). `cut_off`: the backend said the reply
    stopped at the token limit."""
    blocks = FENCE.findall(reply)
    with_net = [(body, bool(end)) for _, body, end in blocks if NET.search(body)]
    if with_net:
        return _complete(*with_net[-1], cut_off)  # the last full version is the final answer
    if blocks:
        joined = "\n\n".join(body.strip() for _, body, _ in blocks)
        if NET.search(joined):
            return _complete(joined, bool(blocks[-1][2]), cut_off)
        return Extracted(None, truncated=cut_off)
    lines = reply.splitlines()
    start = next((i for i, line in enumerate(lines) if CODE_START.match(line)), None)
    code = "\n".join(lines[start:]) if start is not None else ""
    return _complete(code, False, cut_off) if NET.search(code) else Extracted(None, truncated=cut_off)


def _balanced_objects(text: str):
    """Every top-level {...} span, honouring strings, in order."""
    depth, start, in_string, escape = 0, None, False, False
    for i, ch in enumerate(text):
        if in_string:
            escape = not escape and ch == "\\"
            if ch == '"' and not escape:
                in_string = False
            continue
        if ch == '"' and depth:
            in_string = True
        elif ch == "{":
            start = i if depth == 0 else start
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                yield text[start : i + 1]


def extract_json(reply: str, required: tuple[str, ...] = ("problem", "modification")) -> dict | None:
    """A JSON object holding `required` string keys: a fenced block, the bare reply, or the first balanced {...}."""
    fenced = [body for tag, body, _ in FENCE.findall(reply) if tag.lower() in ("json", "")]
    for text in [*fenced, reply.strip(), *_balanced_objects(reply)]:
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            value = {str(k).lower(): v for k, v in value.items()}
            if all(isinstance(value.get(k), str) and value[k].strip() for k in required):
                return {k: value[k].strip() for k in required}
    return None
