"""Diagnostics shaped like the public run's real failures: each names what to fix, and correct code passes."""

import pytest

from edgenas.candidate import check_source, construct, describe_exception, load_module
from edgenas.config import load_config
from edgenas.evaluate import Evaluator
from edgenas.records import FailureKind
from edgenas.sandbox.inside import check_forward

from .conftest import program

INIT = "    def __init__(self, num_classes=4):\n        super().__init__()\n        self.fc = nn.Linear(3, num_classes)\n"


@pytest.mark.parametrize("name, kind, words", [
    ("diag_no_return.py", FailureKind.contract, "line 7: Net.forward never returns a value: end it with `return logits`"),
    ("diag_self_dedented.py", FailureKind.syntax, "indentation error: line 11 uses `self` outside a method"),
    ("diag_self_class_body.py", FailureKind.syntax, "line 5 uses `self` outside a method; it belongs inside __init__"),
    ("diag_no_forward.py", FailureKind.contract, "class Net has no `forward` method; the `def forward` at line 8 is at "
                                                 "module level: indent it into the class"),
])
def test_static_diagnostics_name_the_fix(name, kind, words):
    failure = check_source(program(name))
    assert failure is not None and failure.kind is kind and words in failure.message, failure


@pytest.mark.parametrize("code, words", [
    ("class Net(nn.Module):\n" + INIT, "class Net has no `forward` method: define `def forward(self, x)`"),
    ("class Base(nn.Module):\n    pass\nclass Net(Base):\n" + INIT, "class Net (via its base Base) has no `forward`"),
    ("class Base(nn.Module):\n    def forward(self, x):\n        y = self.fc(x)\nclass Net(Base):\n" + INIT,
     "line 2: Base.forward never returns a value"),
    ("class Net(nn.Module):\n" + INIT + "    def forward(self, x):\n        if x.dim() > 2:\n            return None\n",
     "Net.forward never returns a value"),
    ("class Net(nn.Module):\n" + INIT + "    def forward(self, x):\n        if x.dim() != 4:\n            raise ValueError\n"
     "        y = self.fc(x.mean((2, 3)))\n        return\n", "Net.forward never returns a value"),
])
def test_forward_contract_variants(code, words):
    failure = check_source(code)
    assert failure is not None and failure.kind is FailureKind.contract and words in failure.message, failure


def test_self_outside_methods_beats_the_undefined_name_message():
    failure = check_source("class Net(nn.Module):\n    def forward(self, x):\n        return x\nprint(self.fc)\n")
    assert failure.kind is FailureKind.syntax and "line 4 uses `self`" in failure.message
    assert "not defined" not in failure.message


FORWARD = "    def forward(self, x):\n        return self.fc(x.mean((2, 3)))\n"


@pytest.mark.parametrize("code", [
    # forward inherited from a base class in the module, or from one outside it
    "class Base(nn.Module):\n" + FORWARD + "class Net(Base):\n" + INIT,
    "class Net(nn.Sequential):\n    def __init__(self):\n        super().__init__(nn.Flatten(), nn.LazyLinear(4))\n",
    "import torchvision\nclass Net(torchvision.models.ResNet):\n    pass\n",
    # every path returns, or one does; returns inside nested functions do not count against the outer one
    "class Net(nn.Module):\n" + INIT + "    def forward(self, x):\n        if x.dim() == 4:\n            x = x.mean((2, 3))\n"
    "        else:\n            x = x.flatten(1)\n        return self.fc(x)\n",
    "class Net(nn.Module):\n" + INIT + "    def forward(self, x):\n        def pool(t):\n            return t.mean((2, 3))\n"
    "        for _ in range(2):\n            if x.dim() == 4:\n                return self.fc(pool(x))\n",
    "class Net(nn.Module):\n" + INIT + "    def forward(self, x):\n        with torch.no_grad():\n"
    "            y = x.mean((2, 3))\n        return self.fc(y)\n",
    # forward that never falls off the end: the hang or the exception is the better diagnostic
    "class Net(nn.Module):\n" + INIT + "    def forward(self, x):\n        while True:\n            pass\n",
    "class Net(nn.Module):\n" + INIT + "    def forward(self, x):\n        raise NotImplementedError\n",
    # forward attached other ways
    "def _forward(self, x):\n    return self.fc(x.mean((2, 3)))\nclass Net(nn.Module):\n" + INIT + "    forward = _forward\n",
    "class Net(nn.Module):\n" + INIT + "Net.forward = lambda self, x: self.fc(x.mean((2, 3)))\n",
    # `self` legitimately outside methods: parameters, lambdas, a module-level name
    "def helper(self, x):\n    return self.fc(x)\nclass Net(nn.Module):\n" + INIT + FORWARD,
    "class Net(nn.Module):\n    act = staticmethod(lambda self: self)\n" + INIT + FORWARD,
    "self = None\nclass Net(nn.Module):\n" + INIT + FORWARD + "print(self)\n",
    # a helper module without forward used only as a container
    "class Holder(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.w = nn.Parameter(torch.ones(3))\n"
    "class Net(nn.Module):\n" + INIT + "        self.h = Holder()\n    def forward(self, x):\n"
    "        return self.fc(x.mean((2, 3)) * self.h.w)\n",
])
def test_correct_code_passes_the_static_checks(code):
    assert check_source(code) is None, check_source(code)


def forward_failure(code: str, in_shape=(3, 16, 16)) -> str:
    model, _ = construct(load_module(code)["Net"], in_shape, 4)
    with pytest.raises(Exception) as info:
        check_forward(model, in_shape, 4)
    assert all(not m._forward_pre_hooks for m in model.modules()), "the check's hooks must not outlive it"
    return describe_exception(info.value)


def test_chained_call_names_the_submodule_that_raised():
    message = forward_failure(program("diag_chained_linear.py"))
    assert "candidate.py line 9" in message
    assert "in `head.1` (Linear, expects 64 input features in the last dimension): got input of shape (2, 128)" in message


def test_error_in_the_nets_own_code_blames_no_submodule():
    """A submodule that failed earlier and was caught, then an error in Net.forward itself: no submodule is named."""
    code = ("class Net(nn.Module):\n" + INIT + "        self.bad = nn.Linear(5, 4)\n    def forward(self, x):\n"
            "        try:\n            self.bad(x)\n        except RuntimeError:\n            pass\n"
            "        return x.view(2, 7)\n")
    message = forward_failure(code)
    assert "view" in message and "in `" not in message


@pytest.fixture(scope="module")
def evaluator():
    cfg = load_config(None, ["dataset.name=synthetic", "dataset.num_classes=4", "dataset.in_shape=[3,16,16]",
                             "dataset.synthetic_size=300", "dataset.val_size=60", "train.batch_size=32",
                             "eval.timeout_s=8", "eval.memory_limit_mb=1500", "eval.output_limit_bytes=65536",
                             "eval.latency_runs=3"])
    with Evaluator(cfg) as ev:
        yield ev


@pytest.mark.parametrize("name, words", [
    ("diag_chained_linear.py",
     "in `head.1` (Linear, expects 64 input features in the last dimension): got input of shape (2, 128)"),
    ("diag_sequential_conv.py", "in `features.3` (Conv2d, expects 32 input channels): got input of shape (2, 16, 16, 16)"),
])
def test_shape_errors_name_the_submodule_in_the_jail(evaluator, name, words):
    result = evaluator.evaluate(program(name))
    assert result.failure is not None and result.failure.kind is FailureKind.forward and result.stage == "forward"
    assert words in result.failure.message, result.failure.message


def test_hooks_do_not_change_a_good_run(evaluator):
    assert evaluator.evaluate(program("good_cnn.py")).ok
