"""The candidate contract: a module that defines `class Net(torch.nn.Module)`.

Static checks run in the host before any process is forked, so broken or dangerous code costs
milliseconds. The same module builds the class inside the sandbox and turns exceptions into
diagnostics an LLM can act on (the failing line of the candidate's own code).
"""

from __future__ import annotations

import ast
import inspect
import linecache
import re
import traceback

from edgenas.records import Failure, FailureKind

FILENAME = "candidate.py"
PRELOADED = ("torch", "nn", "F")  # in scope without an import: generated code often forgets them

ALLOWED_IMPORTS = {
    "torch", "torchvision", "math", "functools", "collections", "typing", "typing_extensions", "itertools",
    "operator", "dataclasses", "enum", "abc", "copy", "numbers", "numpy", "__future__", "warnings",
}
FORBIDDEN_MODULE_PATHS = {
    "torch.hub", "torch.compile", "torch.load", "torch.save", "torch.jit.load", "torch.jit.save",
    "torch.ops.load_library", "torch.classes.load_library", "torch.utils.cpp_extension", "torch.multiprocessing",
    "torch.distributed", "torch.utils.data", "torch.utils.tensorboard", "torchvision.datasets", "torchvision.io",
    "torch.backends.cudnn.benchmark",
}
FORBIDDEN_CALLS = {
    "eval", "exec", "compile", "open", "__import__", "globals", "locals", "vars", "breakpoint", "input", "exit",
    "quit", "help", "memoryview",
}
# module objects reachable as attributes of torch & co. (torch.os, torch.sys): no model needs them
FORBIDDEN_ATTRS = {
    "os", "sys", "subprocess", "socket", "shutil", "ctypes", "importlib", "builtins", "pickle", "io", "pathlib",
    "multiprocessing", "threading", "signal", "resource", "urllib", "http", "glob", "tempfile", "gc", "inspect",
    "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__", "__getattribute__", "__reduce__",
    "__reduce_ex__", "__bases__", "__mro__", "__base__", "__import__", "__loader__", "__spec__", "__self__",
    "__func__", "f_globals", "f_locals", "f_back", "f_builtins", "gi_frame", "tb_frame", "co_code",
}
PLACEHOLDER = re.compile(r"^(x{2,}|X{2,}|y{3,}|placeholder\w*|PLACEHOLDER\w*|TODO\w*|TBD|FIXME|your_\w+|YOUR_\w+|\w+_here|\w*HERE)$")


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _forbidden(tree: ast.Module) -> Failure | None:
    aliases = {"nn": "torch.nn", "F": "torch.nn.functional"}
    for node in ast.walk(tree):
        problem = None
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if node.__class__ is ast.ImportFrom and node.level:
                    problem = "relative imports are not allowed: a candidate is a single module"
                elif name.split(".")[0] not in ALLOWED_IMPORTS:
                    problem = f"import of '{name}' is not allowed; a model may import only {', '.join(sorted(ALLOWED_IMPORTS - {'__future__'}))}"
                elif any(name == p or name.startswith(p + ".") for p in FORBIDDEN_MODULE_PATHS):
                    problem = f"import of '{name}' is not allowed in a model"
            for alias in node.names:
                full = f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                aliases[alias.asname or alias.name.split(".")[0]] = full if alias.asname or isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
                if isinstance(node, ast.ImportFrom) and any(full == p or full.startswith(p + ".") for p in FORBIDDEN_MODULE_PATHS):
                    problem = f"'{full}' is not allowed in a model"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
            problem = f"calling {node.func.id}() is not allowed in a model"
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRS:
            problem = f"attribute '.{node.attr}' is not allowed in a model"
        elif isinstance(node, ast.Name) and node.id in {"__builtins__", "__loader__", "__spec__", "__import__"}:
            problem = f"'{node.id}' is not allowed in a model"
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted:
                head, _, rest = dotted.partition(".")
                full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
                if any(full == p or full.startswith(p + ".") for p in FORBIDDEN_MODULE_PATHS):
                    problem = f"'{dotted}' is not allowed in a model (the evaluator owns files, processes and compilation)"
        if problem:
            return Failure(kind=FailureKind.forbidden, message=f"line {node.lineno}: {problem}")
    return None


def _undefined_names(code: str, tree: ast.Module) -> Failure | None:
    """pyflakes finds names used but never defined, before anything runs (the paper lost many runs to them)."""
    from pyflakes import checker, messages

    found = checker.Checker(tree, filename=FILENAME, builtins=set(PRELOADED)).messages
    if any(isinstance(m, messages.ImportStarUsed) for m in found):
        return None  # names may come from the star import: leave it to run time
    for m in sorted(found, key=lambda m: m.lineno):
        if isinstance(m, messages.UndefinedName):
            name = m.message_args[0]
            return Failure(kind=FailureKind.build, message=f"line {m.lineno}: {undefined_hint(name)}")
    return None


def undefined_hint(name: str) -> str:
    if PLACEHOLDER.match(name):
        return (f"name '{name}' is not defined; it looks like a placeholder copied from the prompt template: "
                f"replace it with real code or a concrete value")
    return f"name '{name}' is not defined; define or import it (torch, nn and F are already in scope)"


def check_source(code: str) -> Failure | None:
    """Static checks, cheapest first: syntax, the Net class, forbidden constructs, undefined names."""
    try:
        tree = ast.parse(code, filename=FILENAME)
    except SyntaxError as e:
        where = f"line {e.lineno}: " if e.lineno else ""
        text = f" -> {e.text.strip()}" if e.text else ""
        return Failure(kind=FailureKind.syntax, message=f"{where}{e.msg}{text}")
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Net"]
    if not classes:
        return Failure(kind=FailureKind.contract, message="the module defines no top-level `class Net(nn.Module)`")
    return _forbidden(tree) or _undefined_names(code, tree)


# ---------------------------------------------------------------- inside the sandbox


def load_module(code: str) -> dict:
    """Execute the module with torch, nn and F preloaded; tracebacks then show candidate.py lines."""
    import torch

    linecache.cache[FILENAME] = (len(code), None, code.splitlines(True), FILENAME)
    namespace = {"__name__": "candidate", "torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    exec(compile(code, FILENAME, "exec"), namespace)
    return namespace


def construct(net_class, in_shape: tuple[int, int, int], num_classes: int):
    """Build Net with whichever of (in_shape, num_classes), (num_classes) or () its constructor accepts."""
    import torch

    if not (isinstance(net_class, type) and issubclass(net_class, torch.nn.Module)):
        raise ContractError("`Net` must be a class that subclasses torch.nn.Module")
    params = inspect.signature(net_class.__init__).parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    offered = {"in_shape": tuple(in_shape), "num_classes": num_classes}
    kwargs = {k: v for k, v in offered.items() if var_kw or k in params}
    missing = [n for n, p in list(params.items())[1:] if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
    if missing:
        raise ContractError(
            f"Net.__init__ requires {missing}; the evaluator can only pass in_shape=(C, H, W) and num_classes=N "
            f"(give other arguments defaults)"
        )
    signature = "Net(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return net_class(**kwargs), signature


class ContractError(Exception):
    pass


def describe_exception(exc: BaseException, limit: int = 1200) -> str:
    """The exception and the candidate's own lines it passed through, newest last."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == FILENAME]
    where = "".join(f"\n  candidate.py line {f.lineno}, in {f.name}: {(f.line or '').strip()}" for f in frames[-3:])
    text = str(exc).strip().splitlines()
    head = f"{type(exc).__name__}: {text[0] if text else ''}"
    if isinstance(exc, NameError) and getattr(exc, "name", None):
        head = f"NameError: {undefined_hint(exc.name)}"
    return (head + where)[-limit:] if len(head + where) > limit else head + where


def code_hash(code: str) -> str:
    """Same program, same hash: the AST ignores comments, blank lines and formatting."""
    import hashlib

    try:
        normal = ast.dump(ast.parse(code))
    except SyntaxError:
        normal = "\n".join(line.rstrip() for line in code.strip().splitlines())
    return hashlib.sha256(normal.encode()).hexdigest()
