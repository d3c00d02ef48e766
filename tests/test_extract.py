import pytest

from edgenas.extract import extract_code, extract_json

NET = "class Net(nn.Module):\n    def forward(self, x):\n        return x\n"


@pytest.mark.parametrize("reply", [
    f"```python\n{NET}```",
    f"Here is the improved model:\n\n```py\n{NET}```\n\nIt adds a residual connection.",
    f"```\n{NET}```",
    f"```python\nimport torch\n```\nand the model:\n```python\n{NET}```\nDone.",  # several fences: the one with Net
    f"Sure.\n\n{NET}\nThis keeps the budget.",  # no fence at all, prose around it
    f"```python\n{NET}    def extra(self):\n        return (1,",  # cut off by the token limit
])
def test_code_is_found_in_untidy_replies(reply):
    code = extract_code(reply)
    assert code is not None and code.startswith(("class Net", "import torch")) and "class Net" in code
    compile(code, "candidate.py", "exec")


def test_the_last_complete_version_wins():
    first, second = NET, NET.replace("return x", "return x * 2")
    assert "x * 2" in extract_code(f"Draft:\n```python\n{first}```\nFinal:\n```python\n{second}```")


def test_no_code_at_all_is_none():
    assert extract_code("I would widen the second stage and add dropout.") is None
    assert extract_code("```python\nx = 1\n```") is None


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
