"""Packing with document boundaries: ``data.packing`` "concat" vs "segments" on the CPU
study model (configs/study/cpu.py: 6 layers, d = 128, seq_len 128, batch 8, the
embedded corpus).

    JAX_PLATFORMS=cpu python experiments/packing_compare.py               # ~15 min, 2 cores
    JAX_PLATFORMS=cpu python experiments/packing_compare.py --steps 20    # a quick look

Documents: ``--docs paragraphs`` (default) splits every document of the embedded corpus
at its blank lines into paragraphs of at least 40 characters (9.3k training documents,
median 57 tokens with a 512-piece tokenizer, so a 128-token row holds about two);
``--docs embedded`` keeps the corpus's own documents (pydoc topics and module
docstrings, median ~3k tokens: almost every row then lies inside one document and the
packings differ only at the ~1% of rows with a boundary).

For each layout (standard and two upward layouts) and each packing, trains a fresh
model for ``--steps`` steps (the study config's optimizer, warm-up scaled to the steps),
then reports:

* validation perplexity with the packing the run trained with, and with every document
  alone (= "segments" packing: by the oracle of tests/test_parity_matrix.py a packed row
  gives each document exactly the logits it gets alone, positions from 0; checked here
  again on the first validation batch against the documents run one per row). Both
  packings score the same (input, target) pairs, so the numbers compare directly;
* the train step (median and best of ``--timing-steps`` timed steps on one batch,
  compiled and warmed up first) and the loop's tokens/s (loss tokens; padding excluded).

Writes ``experiments/results/packing_cpu.{json,md}`` with the command and the load
average; times taken under load are labelled as such.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvshare_jax import checkpoint, train
from kvshare_jax.config import load_config
from kvshare_jax.data import get_tokenizer
from kvshare_jax.model import forward
from kvshare_jax.study import time_train_step
from kvshare_jax.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PACKINGS = ("concat", "segments")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "study" / "cpu.py"))
    p.add_argument("--layouts", nargs="+", default=["standard", "pizza-top:3", "lasagna-top:3"])
    p.add_argument("--steps", type=int, default=60, help="train steps per run")
    p.add_argument("--eval-steps", type=int, default=8, help="validation batches")
    p.add_argument("--timing-steps", type=int, default=5, help="timed train steps")
    p.add_argument("--docs", choices=["paragraphs", "embedded"], default="paragraphs")
    p.add_argument("--workdir", default="", help="runs go here (default: a temporary folder)")
    p.add_argument("--name", default="packing_cpu", help="results file stem")
    return p.parse_args(argv)


class Paragraphs:
    """A ``{"text"}`` source whose documents are the paragraphs (blank-line separated,
    at least 40 characters) of another source's documents, in order."""

    def __init__(self, source):
        self._texts = [
            p
            for i in range(len(source))
            for p in source[i]["text"].split("\n\n")
            if len(p.strip()) >= 40
        ]

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> dict[str, str]:
        return {"text": self._texts[index]}


def use_paragraphs() -> None:
    """Every Trainer of this process reads paragraphs of the configured source."""
    opened = train.open_source
    train.open_source = lambda cfg, split: Paragraphs(opened(cfg, split))


def run_config(args: argparse.Namespace, layout: str, packing: str, tokenizer: str):
    config = load_config(args.config)
    config.unlock()
    if "study" in config:
        del config["study"]
    config.lock()
    config.model.layout = layout
    config.data.packing = packing
    config.data.tokenizer_path = tokenizer
    t = config.train
    t.num_steps = args.steps
    t.warmup_steps = max(1, args.steps // 10)
    t.log_every = max(1, args.steps // 3)
    t.eval_every = 0
    t.eval_steps = args.eval_steps
    t.checkpoint_every = args.steps
    return config


def evaluate(config, workdir: str, packing: str) -> dict[str, float]:
    """Validation loss/perplexity of ``workdir``'s checkpoint with ``packing``."""
    config = copy.deepcopy(config)
    config.data.packing = packing
    trainer = train.Trainer(config, workdir)
    params = checkpoint.open_model(workdir, shardings=trainer.shardings.params).params
    return trainer.evaluate(params), trainer, params


def alone_check(trainer, params) -> dict[str, float]:
    """Max |logits| difference between the first validation batch packed with segment
    ids and each of its documents run alone (one per row, right-padded), over the
    batch's loss tokens."""
    batch = next(trainer.iterator(trainer.config.data.eval_split))
    cfg = trainer.cfg
    packed = np.asarray(
        jax.jit(lambda p, x, s: forward(cfg, p, x, segment_ids=s))(
            params, batch["inputs"], batch["segment_ids"]
        )
    )
    docs, where = [], []
    t = batch["inputs"].shape[1]
    for row, ids in enumerate(batch["segment_ids"]):
        for seg in np.unique(ids[ids > 0]):
            at = np.flatnonzero(ids == seg)
            docs.append(np.pad(batch["inputs"][row, at], (0, t - len(at))))
            where.append((row, at))
    alone = np.asarray(jax.jit(lambda p, x: forward(cfg, p, x))(params, jnp.asarray(docs)))
    diff = 0.0
    for i, (row, at) in enumerate(where):
        keep = batch["loss_mask"][row, at] > 0
        diff = max(diff, float(np.abs(packed[row, at][keep] - alone[i, : len(at)][keep]).max()))
    return {"documents": len(docs), "max_abs_logit_diff": diff}


def one_run(args, layout: str, packing: str, tokenizer: str, root: str) -> dict:
    config = run_config(args, layout, packing, tokenizer)
    workdir = os.path.join(root, f"{layout.replace(':', '-')}-{packing}")
    start = time.perf_counter()
    final = train.train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - start
    evals, check = {}, None
    for mode in PACKINGS:
        result, trainer, params = evaluate(config, workdir, mode)
        evals[mode] = result
        if mode == "segments":
            check = alone_check(trainer, params)
    step = time_train_step(config, workdir, args.timing_steps)
    jax.clear_caches()
    return {
        "layout": layout,
        "packing": packing,
        "train_loss": final["loss"],
        "tokens_per_sec": final["tokens_per_sec"],
        "eval_ppl_same_packing": evals[packing]["eval_ppl"],
        "eval_ppl_alone": evals["segments"]["eval_ppl"],
        "eval_ppl_concat": evals["concat"]["eval_ppl"],
        "train_step_median_s": step["median_s"],
        "train_step_min_s": step["min_s"],
        "alone_check": check,
        "wall_s": time.perf_counter() - start,
        "train_wall_s": train_s,
    }


def markdown(out: dict) -> str:
    m = out["meta"]
    lines = [
        "# Packing with document boundaries: concat vs segments (CPU study model)",
        "",
        f"Command: `{m['command']}`  ",
        f"{m['date']}, {m['host']}, JAX {m['jax']}; load average (1, 5, 15 min) at start "
        f"{m['loadavg_start']}, at end {m['loadavg_end']} on {m['cpus']} CPUs.  ",
        f"Model: configs/study/cpu.py (6 layers, d=128, seq_len {m['seq_len']}, batch "
        f"{m['batch_size']}), {m['steps']} train steps per run, validation on "
        f"{m['eval_steps']} batches; documents: {m['docs']} (see the script's docstring); "
        f"total {m['wall_s'] / 60:.1f} min.",
        "",
        "**Timings were taken under load** (other jobs shared the 2 cores): step times "
        "and tokens/s compare runs of this table only roughly."
        if m["loaded"]
        else "Timings on an idle machine.",
        "",
        "Perplexity columns: *same* = evaluated with the packing the run trained with; "
        "*alone* = every document alone (the segments packing, equal to running each "
        "document by itself: checked on the first validation batch, max |logit "
        "difference| below); *concat* = concatenated rows.",
        "",
    ]
    header = ("layout", "train packing", "ppl same", "ppl alone", "ppl concat", "train loss",
              "step median (ms)", "step best (ms)", "loop tok/s", "alone check")  # fmt: skip
    lines += markdown_table(
        header,
        (
            [r["layout"], r["packing"], f"{r['eval_ppl_same_packing']:.2f}",
             f"{r['eval_ppl_alone']:.2f}", f"{r['eval_ppl_concat']:.2f}",
             f"{r['train_loss']:.3f}", f"{r['train_step_median_s'] * 1e3:.0f}",
             f"{r['train_step_min_s'] * 1e3:.0f}", f"{r['tokens_per_sec']:.0f}",
             f"{r['alone_check']['max_abs_logit_diff']:.1e}"]
            for r in out["runs"]
        ),
    )  # fmt: skip
    lines += [
        "",
        "Both packings cut the same rows from the same token stream and score the same "
        '(input, target) pairs (in "segments" a document\'s segment starts at the EOS '
        "of the one before it, which acts as its BOS), so the perplexities compare "
        "directly; only the context differs. Step times include the segment-position "
        "computation and the segment mask (XLA attention on CPU computes every pair "
        "anyway, so no tile is skipped here).",
        "",
        f"Caveat: {m['steps']} steps of one seed each (perplexities near 350: early "
        "training), so this shows the direction and the order of magnitude, not a "
        "converged comparison.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load0, start = os.getloadavg(), time.perf_counter()
    root = args.workdir or tempfile.mkdtemp(prefix="kvshare_packing_")
    if args.docs == "paragraphs":
        use_paragraphs()
    base = load_config(args.config)
    get_tokenizer(base.data, root)  # trained once, shared by every run
    tokenizer = os.path.join(root, "tokenizer.model")
    runs = []
    for layout in args.layouts:
        for packing in PACKINGS:
            r = one_run(args, layout, packing, tokenizer, root)
            print(json.dumps(r), flush=True)
            runs.append(r)
    load1 = os.getloadavg()
    cpus = os.cpu_count() or 1
    out = {
        "meta": {
            "command": "JAX_PLATFORMS=cpu python experiments/packing_compare.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "jax": jax.__version__,
            "cpus": cpus,
            "loadavg_start": [round(x, 2) for x in load0],
            "loadavg_end": [round(x, 2) for x in load1],
            "loaded": max(*load0, *load1) > 0.5 * cpus,
            "docs": args.docs,
            "steps": args.steps,
            "eval_steps": args.eval_steps,
            "seq_len": int(base.train.seq_len),
            "batch_size": int(base.train.batch_size),
            "wall_s": time.perf_counter() - start,
        },
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(out))
    print(markdown(out))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
