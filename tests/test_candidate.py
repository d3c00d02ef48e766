import pytest

from edgenas.candidate import check_source, construct, load_module
from edgenas.records import FailureKind

from .conftest import program

NET = "class Net(nn.Module):\n    def forward(self, x):\n        return x\n"


@pytest.mark.parametrize("code, kind, words", [
    ("class Net(nn.Module)\n    pass\n", FailureKind.syntax, "line 1"),
    ("import torch\nclass Model(torch.nn.Module):\n    pass\n", FailureKind.contract, "class Net"),
    ("import os\n" + NET, FailureKind.forbidden, "line 1: import of 'os'"),
    ("import subprocess as sp\n" + NET, FailureKind.forbidden, "'subprocess'"),
    ("from socket import socket\n" + NET, FailureKind.forbidden, "'socket'"),
    (NET + "x = open('/etc/passwd')\n", FailureKind.forbidden, "line 4: calling open()"),
    (NET + "torch.save({}, 'w.pt')\n", FailureKind.forbidden, "torch.save"),
    (NET + "m = torch.compile(Net())\n", FailureKind.forbidden, "torch.compile"),
    (NET + "torch.os.system('id')\n", FailureKind.forbidden, "'.os'"),
    (NET + "eval('1')\n", FailureKind.forbidden, "eval()"),
    (NET + "y = ().__class__.__base__.__subclasses__()\n", FailureKind.forbidden, "__subclasses__"),
    ("class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(xxx, 10)\n"
     "    def forward(self, x):\n        return self.fc(x)\n",
     FailureKind.build, "line 4: name 'xxx' is not defined; it looks like a placeholder"),
    ("class Net(nn.Module):\n    def forward(self, x):\n        return helper(x)\n", FailureKind.build, "name 'helper' is not defined; define or import"),
])
def test_static_checks_name_the_kind_and_line(code, kind, words):
    failure = check_source(code)
    assert failure is not None and failure.kind is kind and words in failure.message, failure


@pytest.mark.parametrize("name", ["good_cnn.py", "no_imports_fixed_classes.py", "resnet18.py", "view_needs_nchw.py"])
def test_shipped_good_programs_pass_static_checks(name):
    assert check_source(program(name)) is None


def test_torch_nn_and_f_are_preloaded_and_constructor_forms_are_chosen():
    ns = load_module(program("no_imports_fixed_classes.py"))
    _, used = construct(ns["Net"], (3, 32, 32), 10)
    assert used == "Net()"
    ns = load_module(program("good_cnn.py"))
    model, used = construct(ns["Net"], (1, 28, 28), 7)
    assert used == "Net(in_shape=(1, 28, 28), num_classes=7)" and model.fc.out_features == 7
    ns = load_module("class Net(nn.Module):\n    def __init__(self, num_classes):\n        super().__init__()\n")
    assert construct(ns["Net"], (3, 8, 8), 4)[1] == "Net(num_classes=4)"
