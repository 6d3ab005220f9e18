"""The layout study: train, evaluate and benchmark every (layout, l) cell of a study config.

A study config is a run config with a ``study`` section (:func:`study_section`, e.g.
``configs/study/cpu.py``). Each cell trains one layout with ``l`` KV layers; ``standard``
is trained once and is the baseline of every ratio. Workdir::

    tokenizer.model           shared by all cells (unless data.tokenizer_path is set)
    cells/<layout>-l<l>[-s<k>]/  a training workdir (``kvshare_jax/checkpoint.py``) +
                              result.json; ``-s<k>``: the k-th extra seed (study.seeds)
    results.json, report.md, *.png      written by ``kvshare_jax/report.py``

A cell is finished when its ``result.json`` exists (written atomically last) and is
skipped by a rerun; an interrupted cell resumes from its checkpoint. Presets with the
same mapping (e.g. pizza and sandwich at ``l = 2``) are trained once; the later names
reuse the first one's cell.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from kvshare_jax import bench, paths, progress, report
from kvshare_jax.cells import Cell
from kvshare_jax.checkpoint import open_model
from kvshare_jax.config import validate_config
from kvshare_jax.data import get_tokenizer
from kvshare_jax.layout import PRESETS, STANDARD, from_spec
from kvshare_jax.prefill import Prefill
from kvshare_jax.train import Trainer, train_and_evaluate

RESULT_FILE = "result.json"


def study_section() -> ml_collections.ConfigDict:
    """Default ``config.study`` fields (study config files override them)."""
    s = ml_collections.ConfigDict()
    s.layouts = (STANDARD, *PRESETS)  # 'standard' (the baseline) + presets without ':l'
    s.kv_layers = (4,)  # l values: every preset is trained at each
    s.memory_budget = "64MiB"  # generation program memory for the max-batch throughput run
    s.bench_batch_sizes = (1,)  # fixed batches also timed; prefill latency at the first
    s.prompt_len = 16  # prompt tokens of the benchmark
    s.gen_len = 128  # generated tokens of the benchmark
    s.train_step_timing_steps = 10  # timed train steps (after one warm-up) per cell
    s.seeds = 1  # seeds per (layout, l): train.seed + 0..seeds-1 (init and data order)
    s.prefill_passes = "auto"  # benchmark prefill: auto (s.prefill_tol), exact or "m,b"
    s.prefill_tol = None  # tolerance of prefill_passes="auto" (None: prefill.DEFAULT_TOL)
    return s


# ------------------------------------------------------------------ the cells
def plan_cells(config: ml_collections.ConfigDict) -> list[Cell]:
    """All cells of a study config, standard first, then every l in config order, for
    seed 0, then the same for each further seed (``study.seeds``).

    Raises ``ValueError`` naming the field for an unknown layout, a missing ``standard``,
    an ``l`` outside ``[1, L]`` or a benchmark longer than the model context.
    """
    if "study" not in config:
        raise ValueError("the config has no `study` section; use a file from configs/study/")
    s, num_layers = config.study, int(config.model.num_layers)
    if config.train.get("init_from"):
        raise ValueError("train.init_from is not supported by a study: every cell trains anew")
    unknown = [x for x in s.layouts if x != STANDARD and x not in PRESETS]
    if unknown:
        raise ValueError(
            f"study.layouts: unknown layout {unknown[0]!r}; expected 'standard' or one of "
            f"{', '.join(PRESETS)} (without ':l')"
        )
    if STANDARD not in s.layouts:
        raise ValueError("study.layouts must include 'standard' (the baseline of all ratios)")
    if not s.kv_layers:
        raise ValueError("study.kv_layers is empty")
    for kv in s.kv_layers:
        if not 1 <= int(kv) <= num_layers:
            raise ValueError(f"study.kv_layers: {kv} is outside [1, L={num_layers}]")
    if s.prompt_len < 1 or s.gen_len < 1 or s.prompt_len + s.gen_len > config.model.max_len:
        raise ValueError(
            f"study.prompt_len ({s.prompt_len}) + study.gen_len ({s.gen_len}) must be >= 2 "
            f"and fit model.max_len ({config.model.max_len})"
        )
    bench.parse_bytes(s.memory_budget)
    if not s.bench_batch_sizes or min(s.bench_batch_sizes) < 1:
        raise ValueError(f"study.bench_batch_sizes must be >= 1, got {s.bench_batch_sizes}")
    if s.train_step_timing_steps < 1:
        raise ValueError(
            f"study.train_step_timing_steps must be >= 1, got {s.train_step_timing_steps}"
        )
    _prefill_settings(s)
    seeds = int(s.get("seeds", 1))
    if seeds < 1:
        raise ValueError(f"study.seeds must be >= 1, got {seeds}")
    points = [(STANDARD, num_layers)]
    points += [(x, int(kv)) for kv in s.kv_layers for x in s.layouts if x != STANDARD]
    cells, first_of = [], {}
    for seed in range(seeds):  # seed-major: every layout at one seed before the next seed
        for layout, kv in points:
            spec = STANDARD if layout == STANDARD else f"{layout}:{kv}"
            mapping = str(from_spec(spec, num_layers))
            cell = Cell(layout, kv, mapping, seed=seed)
            cells.append(dataclasses.replace(cell, same_as=first_of.get((mapping, seed))))
            first_of.setdefault((mapping, seed), cell.name)
    for cell in cells:
        validate_config(cell_config(config, cell))  # every field, with each cell's layout
    return cells


def cell_config(config: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
    """The run config of ``cell``: the study config with its layout and seed."""
    out = copy.deepcopy(config)
    out.model.layout = cell.spec
    out.train.seed = int(config.train.seed) + cell.seed
    return out


# ------------------------------------------------------------- measurements
def time_train_step(
    config: ml_collections.ConfigDict, workdir: str, steps: int
) -> dict[str, float]:
    """Best and median wall time of one optimizer step on a fixed batch (fresh params,
    compiled and warmed up first, each step blocked until ready). The report uses the
    best, which is the least disturbed by other load, like the generation benchmark."""
    trainer = Trainer(config, workdir)
    state = trainer.init_state()
    batch = next(trainer.batches(trainer.iterator(config.data.train_split)))
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "steps": steps}


def _prefill_settings(s: ml_collections.ConfigDict) -> Prefill:
    """``study.prefill_passes`` / ``study.prefill_tol`` (optional fields); ``ValueError``
    naming the field when invalid."""
    names = ("study.prefill_passes", "study.prefill_tol")
    return Prefill.parse(s.get("prefill_passes"), s.get("prefill_tol"), names)


def benchmark(
    workdir: str, settings: ml_collections.ConfigDict, known_max_batch: Any = None
) -> dict[str, Any]:
    """Generation benchmark of ``workdir``'s checkpoint: the largest batch whose program
    fits ``settings.memory_budget`` (a ``study`` section; ``known_max_batch`` =
    (batch, memory) of another seed skips the search) and its throughput, plus the fixed
    ``settings.bench_batch_sizes``."""
    cfg, params, _, _ = open_model(workdir)
    spec = bench.BenchSpec(
        base=cfg,
        layouts=[str(cfg.layout)],
        batch_sizes=[int(b) for b in settings.bench_batch_sizes],
        prompt_len=int(settings.prompt_len),
        gen_len=int(settings.gen_len),
        memory_budget=bench.parse_bytes(settings.memory_budget),
        prefill_settings=_prefill_settings(settings),
    )
    return bench.measure_layout(str(cfg.layout), cfg, params, spec, known_max_batch=known_max_batch)


def run_cell(
    config: ml_collections.ConfigDict, cell: Cell, workdir: str, known_max_batch: Any = None
) -> dict[str, Any]:
    """Trains (or resumes) ``cell`` in ``workdir`` and measures it; returns its result.
    ``known_max_batch`` (batch, memory) is the max batch another seed of it found."""
    phases: dict[str, float] = {}

    def timed(phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        phases[phase] = time.perf_counter() - start
        return out

    final = timed("train", train_and_evaluate, config, workdir)
    steps = int(config.study.train_step_timing_steps)
    step_time = timed("train_step_timing", time_train_step, config, workdir, steps)
    measured = timed("bench", benchmark, workdir, config.study, known_max_batch)
    layout = from_spec(cell.spec, int(config.model.num_layers))
    return {
        "name": cell.name,
        "seed": int(config.train.seed),
        "layout": cell.layout,
        "kv_layers": cell.kv_layers,
        "spec": cell.spec,
        "mapping": cell.mapping,
        "cache_fraction": layout.cache_fraction,
        "train": {k: final[k] for k in ("step", "loss", "eval_loss", "eval_ppl", "tokens_per_sec")},
        "train_step": step_time,
        "bench": measured,
        "wall_s": sum(phases.values()),
        "phase_s": phases,
    }


# ----------------------------------------------------------------- the study
def _say(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` (local: atomically; first process only)."""
    if jax.process_index() == 0:
        paths.write_json(path, obj)


def _shared_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Path of the study's tokenizer: ``data.tokenizer_path`` or ``<workdir>/tokenizer.model``
    (trained here once, by the first process)."""
    if config.data.tokenizer_path:
        return str(config.data.tokenizer_path)
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        get_tokenizer(config.data, workdir)
    multihost_utils.sync_global_devices("kvshare_study_tokenizer")
    return paths.absolute(paths.join(workdir, "tokenizer.model"))


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every unfinished cell of the study config, then writes the report; a
    progress bar counts the cells done out of those to train, with an ETA.

    Returns the results written to ``<workdir>/results.json``.
    """
    cells = plan_cells(config)
    config = copy.deepcopy(config)
    config.data.tokenizer_path = _shared_tokenizer(config, workdir)
    to_train = [c for c in cells if c.same_as is None]
    _say(
        f"study: {len(cells)} cells, {len(to_train)} to train "
        f"({len(cells) - len(to_train)} share a mapping) in {workdir}"
    )
    results: dict[str, dict[str, Any]] = {}
    finished = [c for c in to_train if epath.Path(_result_path(workdir, c)).exists()]
    first_seed = {c.point: c.trained for c in reversed(cells)}  # the lowest seed's cell
    cells_bar = progress.bar(
        total=len(to_train),
        initial=len(finished),  # the ETA counts only the cells run now
        desc="study",
        unit="cell",
        every=1,
        disable=jax.process_index() != 0,
    )
    with cells_bar:
        for i, cell in enumerate(to_train, 1):
            tag = f"[cell {i}/{len(to_train)}] {cell.name}"
            if cell in finished:
                results[cell.name] = paths.read_json(_result_path(workdir, cell))
                _say(f"{tag}: finished earlier, skipped")
                continue
            _say(f"{tag}: layout {cell.spec} ({cell.mapping})")
            cells_bar.set_postfix(cell=cell.name)
            first = first_seed.get(cell.point)
            known = None
            if first in results:  # the max batch is a memory fit: the same for every seed
                b = results[first]["bench"]
                known = (b["max_batch"], b.get("max_batch_memory"))
            results[cell.name] = _run_and_save(config, cell, workdir, known, tag)
            cells_bar.update(1)
            if i < len(to_train):
                write_results(config, cells, results, workdir)  # the report so far
    out, written = write_results(config, cells, results, workdir)
    _say(f"wrote {workdir}/results.json, " + ", ".join(written))
    return out


def _result_path(workdir: str, cell: Cell) -> str:
    return paths.join(workdir, "cells", cell.name, RESULT_FILE)


def _run_and_save(
    config: ml_collections.ConfigDict, cell: Cell, workdir: str, known: Any, tag: str
) -> dict[str, Any]:
    """Runs ``cell`` (``known``: its max batch from another seed), writes its
    ``result.json`` and prints its numbers; returns the result."""
    cell_dir = paths.join(workdir, "cells", cell.name)
    result = run_cell(cell_config(config, cell), cell, cell_dir, known)
    write_json(_result_path(workdir, cell), result)
    run = result["bench"]["max_batch_run"] or {}
    _say(
        f"{tag}: ppl {result['train']['eval_ppl']:.2f}, max batch "
        f"{result['bench']['max_batch']} at {run.get('e2e_tok_s', 0.0):.0f} tok/s, "
        f"train step {result['train_step']['min_s'] * 1e3:.0f} ms "
        f"({result['wall_s']:.0f} s)"
    )
    jax.clear_caches()
    return result


def write_results(
    config: ml_collections.ConfigDict,
    cells: list[Cell],
    results: dict[str, dict[str, Any]],
    workdir: str,
) -> tuple[dict[str, Any], list[str]]:
    """Writes ``results.json``, ``report.md`` and the figures of the cells finished so far
    (a partial report says how many are missing); returns the results and the paths."""
    done = [c for c in cells if c.trained in results]
    out = report.build_results(config, done, results)
    out["meta"]["cells_total"], out["meta"]["cells_done"] = len(cells), len(done)
    write_json(paths.join(workdir, "results.json"), out)
    written = report.write_report(out, workdir) if jax.process_index() == 0 else []
    return out, written
