"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

EXAMPLES = re.findall(r"```python\n(.*?)```", (Path(__file__).parent.parent / "README.md").read_text(), re.S)


def test_readme_example_runs():
    namespace: dict = {}
    exec(compile(EXAMPLES[0], "README.md", "exec"), namespace)
    assert namespace["kjt"].keys() == ["user_id", "item_id", "hist_item_ids"]


@pytest.mark.parametrize("example", EXAMPLES[1:], ids=lambda e: e.splitlines()[-1][:40])
def test_every_other_readme_example_runs(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
