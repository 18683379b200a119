"""The README's reference parts follow the code: every constructor argument has a row in the
argument table, every ``fused`` value is named, and every state buffer is listed."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from mlx_rmsprop import RMSprop, paths

README = Path(__file__).resolve().parent.parent / "README.md"


def _text() -> str:
    return README.read_text()


def _argument_rows(text: str) -> dict[str, str]:
    start = text.index("| argument | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name = re.match(r"\| `(\w+)` \|", line)
        assert name, line
        rows[name.group(1)] = line
    return rows


def test_the_readme_stays_short():
    assert len(_text().splitlines()) <= 200


def test_every_constructor_argument_has_a_row_with_its_default():
    rows = _argument_rows(_text())
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(RMSprop.__init__).parameters.items()
        if name != "self"
    }
    assert list(rows) == list(parameters)
    for name, parameter in parameters.items():
        default = rows[name].split("|")[2].strip()
        if parameter.default is inspect.Parameter.empty:
            assert default == "(required)", name
        else:
            written = ast.literal_eval(default.strip("`"))
            assert written == parameter.default and type(written) is type(parameter.default), name


def test_every_fused_value_is_named():
    fused = _argument_rows(_text())["fused"]
    paths_table = _text()[_text().index("| `fused` | what runs |") :]
    for value in paths.FUSED_CHOICES:
        spelled = f"`{value!r}`".replace("'", '"')
        assert spelled in fused, value
        assert f"| {spelled} |" in paths_table, value


def test_every_state_buffer_is_listed():
    everything = RMSprop(
        0.1, centered=True, momentum=0.9, use_ema=True, gradient_accumulation_steps=2
    )
    state_line = next(line for line in _text().split("\n\n") if line.startswith("State per"))
    for key in everything.state_keys:
        assert f"`{key}`" in state_line, key
