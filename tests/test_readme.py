"""The README's example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["kjt"].keys() == ["user_id", "item_id", "hist_item_ids"]
