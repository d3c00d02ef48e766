"""Code and JSON out of untidy LLM replies: fences with or without tags, prose around them, no fence at
all, several fences, replies cut off by the token limit."""

from __future__ import annotations

import ast
import json
import re

FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
CODE_START = re.compile(r"^(import |from |class |def |@|#|[A-Za-z_][\w.]* *=)")
NET = re.compile(r"^class\s+Net\b", re.M)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def _trim_to_parse(code: str, max_drop: int = 40) -> str:
    """Drop trailing lines (prose after the code, or a line cut off mid-way) until the module parses."""
    lines = code.rstrip().splitlines()
    for drop in range(min(max_drop, len(lines))):
        attempt = "\n".join(lines[: len(lines) - drop])
        if _parses(attempt) and NET.search(attempt):
            return attempt + "\n"
    return code.rstrip() + "\n"  # let the evaluator report the syntax error precisely


def extract_code(reply: str) -> str | None:
    """The module in a reply, or None when there is no code at all (an outcome of kind `no_code`)."""
    blocks = [body for _, body in FENCE.findall(reply)]
    with_net = [b for b in blocks if NET.search(b)]
    if with_net:
        return _trim_to_parse(with_net[-1])  # the last full version is the final answer
    if blocks:
        joined = "\n\n".join(b.strip() for b in blocks)
        return _trim_to_parse(joined) if NET.search(joined) else None
    lines = reply.splitlines()
    start = next((i for i, line in enumerate(lines) if CODE_START.match(line)), None)
    if start is None:
        return None
    code = "\n".join(lines[start:])
    return _trim_to_parse(code) if NET.search(code) else None


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
    fenced = [body for tag, body in FENCE.findall(reply) if tag.lower() in ("json", "")]
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
