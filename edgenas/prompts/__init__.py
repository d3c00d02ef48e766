"""Prompt templates are data (text files beside this module); this renders them into chat messages."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from string import Template

from edgenas import memory
from edgenas.config import BudgetConfig
from edgenas.records import Candidate, Triple


@dataclass(frozen=True)
class Task:
    dataset: str
    num_classes: int
    in_shape: tuple[int, int, int]
    budget: BudgetConfig
    proxy: str  # e.g. "1 epoch of SGD, lr 0.01, batch 128"
    target: str = ""  # how the target latency is measured, e.g. "int8, batch 1, 1 thread(s)"

    def fields(self) -> dict:
        b = self.budget
        limits = [f"at most {b.max_params:,} parameters" if b.max_params else "",
                  f"at most {b.max_macs:,} MACs per image" if b.max_macs else "",
                  f"at most {b.max_memory_mb:g} MiB of memory for one training step" if b.max_memory_mb else "",
                  f"at most {b.max_target_latency_ms:g} ms median latency on the target device ({self.target})"
                  if b.max_target_latency_ms else ""]
        return {"dataset": self.dataset, "num_classes": self.num_classes,
                "in_shape": "x".join(map(str, self.in_shape)), "in_shape_tuple": str(tuple(self.in_shape)),
                "in_shape_dims": ", ".join(map(str, self.in_shape)), "proxy": self.proxy,
                "budgets": "; ".join(x for x in limits if x) or "none besides being small and fast"}


@cache
def template(name: str) -> Template:
    return Template(files(__package__).joinpath(f"{name}.txt").read_text())


def _render(name: str, **fields) -> str:
    return template(name).substitute(**fields).strip()


def _summary(candidate: Candidate) -> str:
    return candidate.outcome.render().removeprefix("valid: ")


def _chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": _render(system)}, {"role": "user", "content": user}]


# How the parent is named, and what a change to it should achieve: the best (the paper), or a point of the front
PARENT = {False: ("the best model so far", "raise validation accuracy while staying within the budgets"),
          True: ("a model on the front of accuracy against size (no other is both more accurate and smaller)",
                 "raise its validation accuracy without making it larger, or make it smaller and faster at about the "
                 "same accuracy, staying within the budgets")}


def improver_messages(task: Task, best: Candidate, last: Candidate, history: list[Triple], front: bool = False) -> list[dict]:
    parent, goal = PARENT[front]
    return _chat("improver_system", _render(
        "improver", **task.fields(), parent=parent, goal=goal, best_summary=_summary(best), best_code=best.code.strip(),
        last_iteration=last.iteration, last_problem=last.problem or "-", last_modification=last.modification or "-",
        last_outcome=last.outcome.render(), memory=memory.render(history),
    ))


def generator_messages(task: Task, best: Candidate | None, modification: str, history: list[Triple],
                       use_reference: bool = True, front: bool = False) -> list[dict]:
    fields = task.fields()
    contract = _render("contract", **fields)
    if best is None:
        user = _render("initial", **fields, contract=contract, memory=memory.render(history))
    else:
        reference = _render("reference", parent=PARENT[front][0], best_summary=_summary(best),
                            best_code=best.code.strip()) if use_reference else ""
        user = _render("generator", **fields, contract=contract, reference=reference, modification=modification,
                       memory=memory.render(history))
    return _chat("generator_system", user)
