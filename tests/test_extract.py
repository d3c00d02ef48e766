import pytest

from edgenas.extract import Extracted, extract_code, extract_json

NET = "class Net(nn.Module):\n    def forward(self, x):\n        return x\n"


@pytest.mark.parametrize("reply", [
    f"```python\n{NET}```",
    f"Here is the improved model:\n\n```py\n{NET}```\n\nIt adds a residual connection.",
    f"```\n{NET}```",
    f"```python\nimport torch\n```\nand the model:\n```python\n{NET}```\nDone.",  # several fences: the one with Net
    f"Sure.\n\n{NET}\nThis keeps the budget.",  # no fence at all, prose around it
    f"```python\n{NET}",  # no closing fence, but the module is whole
])
def test_code_is_found_in_untidy_replies(reply):
    extracted = extract_code(reply)
    code = extracted.code
    assert not extracted.truncated and code is not None and code.startswith(("class Net", "import torch"))
    assert "class Net" in code
    compile(code, "candidate.py", "exec")


def test_the_last_complete_version_wins():
    first, second = NET, NET.replace("return x", "return x * 2")
    assert "x * 2" in extract_code(f"Draft:\n```python\n{first}```\nFinal:\n```python\n{second}```").code


def test_no_code_at_all_is_none():
    assert extract_code("I would widen the second stage and add dropout.") == Extracted(None)
    assert extract_code("```python\nx = 1\n```") == Extracted(None)


CUT = ("class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
       "        self.a = nn.Conv2d(3, 8, 3)\n")


@pytest.mark.parametrize(("prefix", "code", "cut_off"), [
    ("```python\n", f"{CUT}        self.b = nn.Conv2d(8,", False),  # parses only once its tail is trimmed
    ("Sure.\n\n", f"{CUT}    def forward(self, x):\n        return (self.a(x),", False),  # no fence
    ("```python\n", CUT, True),  # parses, but the backend says the token limit stopped it: forward is missing
])
def test_cut_off_code_is_truncated_and_kept_as_it_came(prefix, code, cut_off):
    assert extract_code(prefix + code, cut_off=cut_off) == Extracted(code.rstrip() + "\n", truncated=True)


def test_a_reply_cut_off_before_any_code_is_truncated():
    assert extract_code("Plan: widen the first stage, then", cut_off=True) == Extracted(None, truncated=True)


def test_a_closed_fence_is_complete_even_when_the_prose_after_it_was_cut_off():
    assert extract_code(f"```python\n{NET}```\nThis model adds a resid", cut_off=True) == Extracted(NET)


@pytest.mark.parametrize("reply", [
    '{"problem": "p", "modification": "m"}',
    '```json\n{"problem": "p", "modification": "m"}\n```',
    'Analysis first.\n{"Problem": "p", "Modification": "m"}\nThat is all.',
    'Two: {"note": {"nested": "}"}} then {"problem": "p", "modification": "m"}',
])
def test_json_is_found_tolerantly(reply):
    assert extract_json(reply) == {"problem": "p", "modification": "m"}


@pytest.mark.parametrize("reply", ["no json", '{"problem": "p"}', '{"problem": "", "modification": "m"}', "{broken"])
def test_unusable_json_is_none(reply):
    assert extract_json(reply) is None
