"""The layout study: cell planning, report derivation, and a micro-study end to end
(files written, finished cells skipped on rerun, numbers traced back to the cells)."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import trainutil as tu

from kvshare_jax import report, study
from kvshare_jax.commands import study as study_command
from kvshare_jax.config import load_config
from kvshare_jax.layout import PRESETS

STUDY_DIR = os.path.join(tu.ROOT, "configs", "study")
CPU_STUDY = os.path.join(STUDY_DIR, "cpu.py")

# A 2-layer d=64 model trained 4 steps; with l = 1, pizza-bottom and lasagna-bottom are the
# same mapping "0_0" (one cell); generation of 8 tokens after 4 under a 1 MiB budget.
MICRO = (
    *tu.TINY,
    "model.num_layers=2",
    "train.num_steps=4",
    "train.log_every=2",
    "train.eval_steps=2",
    "train.checkpoint_every=4",
    "study.layouts=('standard','pizza-bottom','lasagna-bottom')",
    "study.kv_layers=(1,)",
    "study.memory_budget=1MiB",
    "study.bench_batch_sizes=(1,)",
    "study.prompt_len=4",
    "study.gen_len=8",
    "study.train_step_timing_steps=2",
)


def micro_argv(workdir: str) -> list[str]:
    overrides = (*MICRO, f"data.tokenizer_path={tu.tokenizer_path()}")
    return [f"--config={CPU_STUDY}", f"--workdir={workdir}"] + [f"--config.{o}" for o in overrides]


# ------------------------------------------------------------------ planning
def test_study_configs_plan_standard_once_and_every_preset_per_l():
    expected = {"cpu.py": (6, (3,)), "llama_110m.py": (12, (6, 3, 2))}
    expected["tinyllama_1b.py"] = (22, (11, 6, 3))
    for name, (num_layers, kv_layers) in expected.items():
        config = load_config(os.path.join(STUDY_DIR, name))
        cells = study.plan_cells(config)
        assert config.model.num_layers == num_layers
        assert tuple(config.study.kv_layers) == kv_layers
        assert [c.name for c in cells[:1]] == [f"standard-l{num_layers}"]
        assert [c.name for c in cells[1:]] == [f"{p}-l{kv}" for kv in kv_layers for p in PRESETS]


def test_cells_with_the_same_mapping_share_one_run():
    config = load_config(CPU_STUDY, ("study.kv_layers=(2,)",))
    cells = {c.name: c for c in study.plan_cells(config)}
    # l = 2: pizza and sandwich both keep layer 0 and share one block [1, 5]
    for position in ("bottom", "top", "middle"):
        sandwich = cells[f"sandwich-{position}-l2"]
        assert sandwich.same_as == f"pizza-{position}-l2"
        assert sandwich.mapping == cells[f"pizza-{position}-l2"].mapping
    assert cells["sandwich-top-l2"].mapping == "0_5_5_5_5_5"
    assert cells["lasagna-bottom-l2"].same_as is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.layouts=('pizza-bottom',)", "must include 'standard'"),
        ("study.layouts=('standard','pizza-bottom:3')", "unknown layout 'pizza-bottom:3'"),
        ("study.kv_layers=(7,)", "outside [1, L=6]"),
        ("study.gen_len=250", "model.max_len"),
    ],
)
def test_bad_study_fields_are_named(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        study.plan_cells(load_config(CPU_STUDY, (override,)))


def test_cli_rejects_a_config_without_study_section(tmp_path, capsys):
    tiny = os.path.join(tu.ROOT, "configs", "tiny.py")
    assert study_command.run([f"--config={tiny}", f"--workdir={tmp_path}"]) == 2
    assert "no `study` section" in capsys.readouterr().err


# -------------------------------------------------------------------- report
def _row(layout: str, ppl: float, tok_s: float) -> dict:
    return {"layout": layout, "mapping": layout, "eval_ppl": ppl, "tok_s": tok_s}


def test_pareto_front_keeps_only_undominated_layouts():
    rows = [
        _row("standard", 10.0, 100.0),
        _row("a", 11.0, 200.0),  # faster, worse
        _row("b", 12.0, 150.0),  # dominated by a
        _row("c", 10.5, 90.0),  # dominated by standard
        _row("d", 13.0, 300.0),  # fastest
    ]
    assert [r["layout"] for r in report.pareto_front(rows)] == ["d", "a", "standard"]


@pytest.mark.parametrize("winner", ["pizza-bottom", "lasagna-bottom"])
def test_summary_is_derived_from_the_numbers(winner):
    config = load_config(CPU_STUDY, ("study.layouts=('standard','pizza-bottom','lasagna-bottom')",))
    cells = study.plan_cells(config)
    results = {c.trained: tu.fake_study_result(c, 20.0, 100.0) for c in cells}
    results[f"{winner}-l3"] = tu.fake_study_result(cells[1], 19.0, 150.0)  # better on both axes
    out = report.build_results(config, cells, results)
    assert out["pareto"]["3"] == [winner]
    text = "\n".join(report.summary(out))
    assert f"Pareto front of the means, fastest first: {winner} (ppl 19.00, 1.50x)." in text
    assert f"Lowest mean perplexity: {winner} (ppl 19.00, -5.0% vs standard: not tested" in text
    assert f"l = 3: {winner}. One seed: no difference between layouts is claimed" in text


def _seeded(config_overrides, ppl_of, seeds=3):
    """Study results over ``seeds`` seeds: ``ppl_of(layout, seed)`` per cell."""
    config = load_config(CPU_STUDY, (*config_overrides, f"study.seeds={seeds}"))
    cells = study.plan_cells(config)
    results = {
        c.trained: tu.fake_study_result(c, ppl_of(c.layout, c.seed), 100.0 + c.seed) for c in cells
    }
    return report.build_results(config, cells, results)


def test_seeded_study_reports_intervals_and_claims_only_significant_differences():
    layouts = "study.layouts=('standard','pizza-bottom','lasagna-bottom','sandwich-top')"
    noise = [0.0, 0.3, -0.3]
    ppl = {
        "standard": lambda k: 20.0 + noise[k],
        "pizza-bottom": lambda k: 18.0 + noise[k] + 0.01 * k,  # better on every seed
        "lasagna-bottom": lambda k: 20.0 + [0.2, -0.2, 0.05][k],  # within noise of standard
        "sandwich-top": lambda k: 18.2 + noise[k] + [0.6, -0.6, 0.0][k],  # tied with pizza
    }
    out = _seeded((layouts,), lambda layout, k: ppl[layout](k))
    rows = {r["layout"]: r for r in out["rows"]}
    assert [r["seeds"] for r in out["rows"]] == [3] * 4
    # mean and t interval of the three seeds (t_0.975,2 = 4.303)
    values = [ppl["lasagna-bottom"](k) for k in range(3)]
    half = 4.302652729911275 * statistics.stdev(values) / math.sqrt(3)
    assert rows["lasagna-bottom"]["eval_ppl"] == pytest.approx(statistics.fmean(values))
    assert rows["lasagna-bottom"]["eval_ppl_ci"] == pytest.approx(half)
    assert rows["pizza-bottom"]["vs_standard"]["eval_ppl"]["significant"]
    assert not rows["lasagna-bottom"]["vs_standard"]["eval_ppl"]["significant"]
    text = "\n".join(report.summary(out))
    assert "Lowest mean perplexity: pizza-bottom" in text
    assert "significant, p = " in text
    assert "Not significantly different from it: sandwich-top." in text
    assert "l = 3: pizza-bottom (tied within noise with sandwich-top)" in text
    md = report.markdown(out)
    assert "± " in md and "paired t-test" in md


def test_seeds_get_their_own_cells_seed_and_data_order():
    config = load_config(CPU_STUDY, ("study.layouts=('standard','pizza-bottom')", "study.seeds=2"))
    cells = study.plan_cells(config)
    assert [c.name for c in cells] == [
        "standard-l6", "pizza-bottom-l3", "standard-l6-s1", "pizza-bottom-l3-s1"
    ]  # fmt: skip
    seeds = [study.cell_config(config, c).train.seed for c in cells]
    assert seeds == [config.train.seed, config.train.seed, config.train.seed + 1] * 1 + [
        config.train.seed + 1
    ]
    with pytest.raises(ValueError, match="study.seeds must be >= 1"):
        study.plan_cells(load_config(CPU_STUDY, ("study.seeds=0",)))


def test_report_is_rebuilt_after_every_cell(tmp_path, monkeypatch):
    """report.md and results.json exist, marked partial, before the last cell starts."""
    config = load_config(
        CPU_STUDY,
        (
            "study.layouts=('standard','pizza-bottom','lasagna-top')",
            f"data.tokenizer_path={tu.tokenizer_path()}",
        ),
    )
    workdir = tmp_path / "study"
    seen = []

    def fake_cell(cell_config, cell, cell_dir, known_max_batch=None):
        report_md = workdir / "report.md"
        seen.append(report_md.read_text() if report_md.exists() else None)
        os.makedirs(cell_dir)  # as training the cell does
        return tu.fake_study_result(cell, 20.0 - len(seen), 100.0 + len(seen))

    monkeypatch.setattr(study, "run_cell", fake_cell)
    out = study.run_study(config, str(workdir))
    assert seen[0] is None  # nothing to report before the first cell
    assert "Partial report: 1 of 3 cells finished" in seen[1]
    assert "Partial report: 2 of 3 cells finished" in seen[2]
    assert "| pizza-bottom |" in seen[2] and "| lasagna-top |" not in seen[2]
    final = (workdir / "report.md").read_text()
    assert "Partial report" not in final and "| lasagna-top |" in final
    assert out["meta"]["cells_done"] == out["meta"]["cells_total"] == 3


def test_later_seeds_reuse_the_first_seeds_max_batch(tmp_path, monkeypatch):
    config = load_config(
        CPU_STUDY,
        (
            "study.layouts=('standard','pizza-bottom')",
            "study.seeds=2",
            f"data.tokenizer_path={tu.tokenizer_path()}",
        ),
    )
    calls = {}

    def fake_cell(cell_config, cell, cell_dir, known_max_batch=None):
        calls[cell.name] = (cell_config.train.seed, known_max_batch)
        os.makedirs(cell_dir)
        return tu.fake_study_result(cell, 20.0, 100.0)

    monkeypatch.setattr(study, "run_cell", fake_cell)
    study.run_study(config, str(tmp_path / "study"))
    seed = config.train.seed
    assert calls == {
        "standard-l6": (seed, None),
        "pizza-bottom-l3": (seed, None),
        "standard-l6-s1": (seed + 1, (10, None)),  # _fake_result: max batch 10 / fraction
        "pizza-bottom-l3-s1": (seed + 1, (20, None)),
    }


# ------------------------------------------------------------------- the run
@pytest.mark.slow  # two minutes on 2 cores; the preemption and progress tests run by default
def test_micro_study_runs_reports_and_skips_finished_cells(tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path / "study")
    assert study_command.run(micro_argv(workdir)) == 0
    out = capsys.readouterr().out
    assert "[cell 2/2] pizza-bottom-l1" in out
    for name in ("report.md", "results.json", *report.FIGURES.values()):
        assert os.path.getsize(os.path.join(workdir, name)) > 0

    cells = {}
    for name in ("standard-l2", "pizza-bottom-l1"):
        with open(os.path.join(workdir, "cells", name, study.RESULT_FILE)) as f:
            cells[name] = json.load(f)
    assert sorted(os.listdir(os.path.join(workdir, "cells"))) == sorted(cells)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["cells"] == cells
    std, pizza, lasagna = results["rows"]
    assert (pizza["mapping"], lasagna["same_as"]) == ("0_0", "pizza-bottom-l1")
    # every number of a row is the cell's measurement or a ratio of two of them
    tok_s = {n: c["bench"]["max_batch_run"]["e2e_tok_s"] for n, c in cells.items()}
    step_s = {n: c["train_step"]["min_s"] for n, c in cells.items()}
    for row in (pizza, lasagna):
        cell = cells["pizza-bottom-l1"]
        assert row["eval_ppl"] == cell["train"]["eval_ppl"]
        assert row["max_batch"] == cell["bench"]["max_batch"] > 0
        assert row["tok_s_ratio"] == tok_s["pizza-bottom-l1"] / tok_s["standard-l2"]
        assert row["train_step_ratio"] == step_s["pizza-bottom-l1"] / step_s["standard-l2"]
        assert row["cache_fraction"] == 0.5
    assert (
        std["tok_s_ratio"] == 1.0 and std["eval_ppl"] == cells["standard-l2"]["train"]["eval_ppl"]
    )
    assert results["pareto"]["1"] == [r["layout"] for r in report.pareto_front(results["rows"])]
    text = (tmp_path / "study" / "report.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| pizza-bottom |"))
    assert f"| {pizza['eval_ppl']:.2f} |" in line and f"| {pizza['tok_s_ratio']:.2f}x |" in line
    assert "## Which layout should I use?" in text

    # A rerun trains and measures nothing: every cell is finished.
    mtimes = {
        n: os.stat(os.path.join(workdir, "cells", n, study.RESULT_FILE)).st_mtime_ns for n in cells
    }

    def must_not_run(*args):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(study, "run_cell", must_not_run)
    assert study_command.run(micro_argv(workdir)) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    for name, mtime in mtimes.items():
        assert os.stat(os.path.join(workdir, "cells", name, study.RESULT_FILE)).st_mtime_ns == mtime
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["rows"] == results["rows"]


def test_preempted_study_saves_the_cell_in_progress_and_resumes(tmp_path, capsys, monkeypatch):
    """A preemption notice during the first cell's training: the study saves that cell's
    step and exits 143; the same command resumes the cell from it and finishes."""
    from kvshare_jax import preemption

    workdir = str(tmp_path / "study")
    noticed = []

    def reached(self, step):  # the notice arrives at step 2 of the first cell
        noticed.append(step)
        return len(noticed) == 2

    monkeypatch.setattr(preemption.Guard, "reached", reached)
    assert study_command.run(micro_argv(workdir)) == preemption.EXIT_STATUS
    assert "preempted (SIGTERM): saved step 2" in capsys.readouterr().err
    (cell,) = os.listdir(os.path.join(workdir, "cells"))
    assert not os.path.exists(os.path.join(workdir, "cells", cell, study.RESULT_FILE))
    monkeypatch.undo()
    assert study_command.run(micro_argv(workdir)) == 0
    assert "from step 2" in capsys.readouterr().out
    assert os.path.exists(os.path.join(workdir, "cells", cell, study.RESULT_FILE))


def test_report_plots_named_methods_and_mapping_strings(tmp_path, monkeypatch):
    """The figures draw rows of named methods and mapping strings (no preset colour or
    marker), each with a style of its own."""
    layouts = "('standard','pizza-bottom','lasagna-top','sandwich-top')"
    out = tu.run_fake_study(monkeypatch, str(tmp_path / "study"), layouts)
    for row, name in zip(out["rows"][1:], ("cla:2", "yoco", "0_0_2_2_4_4"), strict=True):
        row["layout"] = name
    report.plot_tradeoff(out, str(tmp_path / "tradeoff.png"))
    report.plot_vs_kv_layers(out, str(tmp_path / "kv_layers.png"))
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert (tmp_path / "kv_layers.png").stat().st_size > 0
    styles = {tuple(sorted(report._style(r["layout"]).items())) for r in out["rows"]}
    assert len(styles) == 4
