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


def _self_outside_methods(tree: ast.Module) -> Failure | None:
    """`self` used at module or class-body level: lines meant for __init__ lost their indentation.

    Before pyflakes, whose "name 'self' is not defined" sends the LLM looking for a missing definition.
    """
    outside = list(_outside_functions(tree))
    bound = any(isinstance(n, ast.Global | ast.Nonlocal) and "self" in n.names for n in ast.walk(tree)) or any(
        (isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load) and n.id == "self")
        or (isinstance(n, ast.alias) and (n.asname or n.name) in ("self", "*"))
        or (isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and n.name == "self")
        for n in outside)
    uses = [n for n in outside if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id == "self"]
    if bound or not uses:
        return None
    return Failure(kind=FailureKind.syntax, message=(
        f"indentation error: line {uses[0].lineno} uses `self` outside a method; it belongs inside __init__ "
        f"(or forward): indent it"))


def _outside_functions(node: ast.AST):
    """Every node not inside a function or lambda body (the function's own name node is yielded)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _outside_functions(child)


MODULE_BASES = {"nn.Module", "torch.nn.Module", "Module"}


def _forward_contract(tree: ast.Module) -> Failure | None:
    """Net without forward, or a forward that never returns a value (the public run's 'returned None' failures).

    Only what is certain is reported: a base class from outside the module, a forward assigned or decorated, a
    forward that can only loop or raise are left to run time.
    """
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    if any(isinstance(n, ast.Attribute) and n.attr == "forward" and not isinstance(n.ctx, ast.Load)
           or isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "setattr"
           for n in ast.walk(tree)):
        return None  # forward attached from outside the class body
    owner, seen = classes["Net"], set()
    while True:
        seen.add(owner.name)
        names = {t.id for n in owner.body if isinstance(n, ast.Assign | ast.AnnAssign)
                 for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        if {"forward", "__call__", "__getattr__", "__getattribute__"} & names:
            return None
        methods = {n.name: n for n in owner.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        if "forward" in methods:
            return _returns_value(owner.name, methods["forward"])
        if {"__call__", "__getattr__", "__getattribute__"} & methods.keys() or owner.keywords:
            return None
        bases = [_dotted(b) for b in owner.bases]
        local = [b for b in bases if b in classes and b not in seen]
        if len(bases) == 1 and local:
            owner = classes[local[0]]
        elif bases and all(b in MODULE_BASES for b in bases):
            break
        else:
            return None  # a base from outside the module (nn.Sequential, a torchvision model) may define forward
    stray = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "forward"]
    hint = (f"; the `def forward` at line {stray[0].lineno} is at module level: indent it into the class" if stray
            else ": define `def forward(self, x)` returning logits of shape (B, num_classes)")
    where = f"Net (via its base {owner.name})" if owner.name != "Net" else "Net"
    return Failure(kind=FailureKind.contract, message=f"line {owner.lineno}: class {where} has no `forward` method{hint}")


def _returns_value(cls: str, forward: ast.FunctionDef | ast.AsyncFunctionDef) -> Failure | None:
    if forward.decorator_list or isinstance(forward, ast.AsyncFunctionDef):
        return None
    nodes = list(_outside_functions(ast.Module(body=forward.body, type_ignores=[])))
    if any(isinstance(n, ast.Yield | ast.YieldFrom) or isinstance(n, ast.Return) and n.value is not None
           and not (isinstance(n.value, ast.Constant) and n.value.value is None) for n in nodes):
        return None
    if _never_falls_through(forward.body):
        return None  # loops forever or raises: a hang or the exception says more at run time
    return Failure(kind=FailureKind.contract, message=(
        f"line {forward.lineno}: {cls}.forward never returns a value: end it with `return logits` (the output "
        f"tensor of shape (B, num_classes))"))


def _never_falls_through(body: list[ast.stmt]) -> bool:
    """Every path raises or loops forever (a bare `return` still hands back None)."""
    for stmt in body:
        if isinstance(stmt, ast.Raise):
            return True
        if isinstance(stmt, ast.While) and isinstance(stmt.test, ast.Constant) and stmt.test.value \
                and not any(isinstance(n, ast.Break) for n in ast.walk(stmt)):
            return True
        if isinstance(stmt, ast.If) and _never_falls_through(stmt.body) and _never_falls_through(stmt.orelse):
            return True
        if isinstance(stmt, ast.With) and _never_falls_through(stmt.body):
            return True
    return False


def check_source(code: str) -> Failure | None:
    """Static checks, cheapest first: syntax, the Net class, forbidden constructs, `self` outside methods, the
    forward contract, undefined names."""
    try:
        tree = ast.parse(code, filename=FILENAME)
    except SyntaxError as e:
        where = f"line {e.lineno}: " if e.lineno else ""
        text = f" -> {e.text.strip()}" if e.text else ""
        return Failure(kind=FailureKind.syntax, message=f"{where}{e.msg}{text}")
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Net"]
    if not classes:
        return Failure(kind=FailureKind.contract, message="the module defines no top-level `class Net(nn.Module)`")
    return _forbidden(tree) or _self_outside_methods(tree) or _forward_contract(tree) or _undefined_names(code, tree)


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
    where += "".join(f"\n  {note}" for note in getattr(exc, "__notes__", ()))  # e.g. the submodule that raised
    return (head + where)[-limit:] if len(head + where) > limit else head + where


def code_hash(code: str) -> str:
    """Same program, same hash: the AST ignores comments, blank lines and formatting."""
    import hashlib

    try:
        normal = ast.dump(ast.parse(code))
    except SyntaxError:
        normal = "\n".join(line.rstrip() for line in code.strip().splitlines())
    return hashlib.sha256(normal.encode()).hexdigest()
