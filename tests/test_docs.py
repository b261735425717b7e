"""The docstring examples of the public API and the README's example block run as written."""
import doctest
import pathlib
import re

import fastnorm.api
import fastnorm._dispatch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_api_docstring_examples():
    for mod in (fastnorm.api, fastnorm._dispatch):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, (mod.__name__, result)


def test_readme_examples():
    if not README.exists():  # an installed copy without the source tree
        return
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
