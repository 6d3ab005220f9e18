"""Progress bars: tqdm on a terminal; plain lines every N updates otherwise (logs, CI);
``TQDM_DISABLE=1`` silences both; the study and ``kvshare eval`` use them."""

from __future__ import annotations

import io

import pytest
import tqdm
import trainutil as tu

from kvshare_jax import progress
from kvshare_jax.commands import eval as eval_command


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(text: str, prefix: str = "") -> list[str]:
    """The lines of ``text`` starting with ``prefix`` (other output: warnings...)."""
    assert "\r" not in text  # no carriage-return redraws in a log
    return [x for x in text.splitlines() if x.startswith(prefix)]


def test_log_mode_prints_one_line_every_n_updates(capsys):
    with progress.bar(total=100, desc="train", unit="step", every=10) as bar:
        for _ in range(100):
            bar.update(1)
    out = lines(capsys.readouterr().err)
    assert len(out) == 10
    assert out[0].startswith("train: 10/100 step (10%) [")
    assert out[-1].startswith("train: 100/100 step (100%) [")


def test_postfix_shows_from_the_next_line(capsys):
    bar = progress.bar(total=4, desc="train", every=2)
    bar.update(1)
    bar.set_postfix(loss=2.5)
    bar.update(1)  # a line, with the postfix set before it
    bar.set_postfix(loss="1.250")
    bar.update(2)
    bar.close()  # nothing moved since the last line: no line
    out = lines(capsys.readouterr().err)
    assert len(out) == 2
    assert out[0].endswith("loss=2.5]") and out[1].endswith("loss=1.250]")


def test_a_resumed_bar_counts_from_initial_and_shows_an_eta(capsys):
    with progress.bar(total=100, initial=40, desc="train", every=20) as bar:
        bar.update(20)
        bar.update(40)
    out = lines(capsys.readouterr().err)
    assert [x.split(" [")[0] for x in out] == [
        "train: 60/100 it (60%)",
        "train: 100/100 it (100%)",
    ]
    assert "<" in out[0]  # elapsed<remaining


def test_unknown_total_and_iterables(capsys):
    with progress.bar(desc="read", unit="tensor", every=3) as bar:
        for _ in range(7):
            bar.update(1)
    assert [x.split(" [")[0] for x in lines(capsys.readouterr().err)] == [
        "read: 3 tensor",
        "read: 6 tensor",
        "read: 7 tensor",  # at close
    ]
    assert list(progress.bar(range(30), desc="x", every=10)) == list(range(30))
    assert len(lines(capsys.readouterr().err)) == 3


def test_an_error_inside_prints_no_last_line(capsys):
    with pytest.raises(ValueError):
        with progress.bar(total=10, every=4) as bar:
            bar.update(3)
            raise ValueError("bad input")
    assert capsys.readouterr().err == ""  # the error message alone follows


def test_a_terminal_gets_tqdm():
    stream = Terminal()
    with progress.bar(total=3, desc="t", file=stream) as bar:
        assert isinstance(bar, tqdm.tqdm)
        bar.update(3)
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()


@pytest.mark.parametrize("value, silent", [("1", True), ("true", True), ("0", False)])
def test_tqdm_disable_silences_both_modes(monkeypatch, value, silent):
    monkeypatch.setenv("TQDM_DISABLE", value)
    for stream in (io.StringIO(), Terminal()):
        with progress.bar(total=2, every=1, file=stream) as bar:
            bar.update(2)
        assert (stream.getvalue() == "") == silent


def test_study_prints_a_line_per_cell_with_an_eta(tmp_path, monkeypatch, capsys):
    layouts = "('standard','pizza-bottom','lasagna-top')"
    tu.run_fake_study(monkeypatch, str(tmp_path / "study"), layouts)
    out = lines(capsys.readouterr().err, "study:")
    assert [x.split(" [")[0] for x in out] == [
        f"study: {i}/3 cell ({i / 3:.0%})" for i in (1, 2, 3)
    ]
    assert "<" in out[0] and out[0].endswith("cell=standard-l6]")
    tu.run_fake_study(monkeypatch, str(tmp_path / "study"), layouts)  # all finished: no line
    assert lines(capsys.readouterr().err, "study:") == []


def test_eval_command_counts_the_batches(capsys):
    workdir = tu.reference_run()  # trained on first use: its output is not looked at
    capsys.readouterr()
    assert eval_command.run([f"--workdir={workdir}", "--eval-steps=3"]) == 0
    out = lines(capsys.readouterr().err, "eval:")
    assert [x.split(" [")[0] for x in out] == [
        f"eval: {i}/3 batch ({i / 3:.0%})" for i in (1, 2, 3)
    ]
