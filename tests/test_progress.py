"""Progress bars of the long phases: on a terminal, for phases long enough to need one; never in logs."""

from __future__ import annotations

from visiontune.core.progress import MIN_STEPS, progress


def test_a_bar_only_where_asked_and_long_enough(capsys):
    items = list(range(MIN_STEPS + 5))
    assert list(progress(items, "features", enabled=True)) == items
    assert "features" in capsys.readouterr().err  # tqdm draws on stderr
    assert list(progress(items[:3], "features", enabled=True)) == items[:3]
    assert list(progress(iter(items), "predicting", total=len(items), enabled=False)) == items
    assert capsys.readouterr().err == ""  # too short, or not a terminal: nothing drawn


def test_a_pipe_gets_no_bar(capsys):
    """Under pytest stderr is not a terminal, as in CI logs and `visiontune ... 2> log`."""
    assert list(progress(range(100), "features")) == list(range(100))
    assert capsys.readouterr().err == ""
