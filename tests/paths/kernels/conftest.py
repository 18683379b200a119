"""What the kernel tests share: planting a regression in the kernel text, to show that a check
fails on it."""

from __future__ import annotations

import pytest

from mlx_rmsprop.paths.kernels import source


@pytest.fixture
def mutate_source(monkeypatch):
    """``mutate(old, new, index_line=None)`` replaces ``old`` by ``new`` in the shared body (or
    in one backend's index line) for one test; the kernel text is rebuilt on both sides."""

    def mutate(old: str, new: str, index_line: str | None = None) -> None:
        if index_line:
            line = source.INDEX_LINES[index_line]
            assert old in line
            lines = {**source.INDEX_LINES, index_line: line.replace(old, new)}
            monkeypatch.setattr(source, "INDEX_LINES", lines)
        else:
            body = source.body_text()
            assert old in body
            monkeypatch.setattr(source, "body_text", lambda: body.replace(old, new))
        source.kernel_body.cache_clear()

    yield mutate
    monkeypatch.undo()
    source.kernel_body.cache_clear()
