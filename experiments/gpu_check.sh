#!/usr/bin/env bash
# One-shot GPU check for a lent NVIDIA H200 (about 8 minutes, no internet there).
#
#   bash experiments/gpu_check.sh              # on the GPU machine
#   bash experiments/gpu_check.sh --dry-run    # here: JAX_PLATFORMS=cpu, tiny sizes, interpret
#   (or DRY_RUN=1)
#
# Results go under $OUT (default experiments/results/gpu). When OUT comes from the
# environment (the device tool sets it, and it brings back at most 8 files), the per-stage
# files are written to $RAW (default: a temp dir) and packed into $OUT/gpu_check_raw.tar.gz
# after every stage; $OUT then holds only gpu_check.log, summary.md, the tarball and the
# three markdown reports. With OUT unset, every file lands in $OUT directly.
#
# Stages (each under its own `timeout`, clipped to a global deadline of $BUDGET_S seconds;
# a failing stage does not stop the others; the exit status is non-zero if any failed):
#   env     nvidia-smi once; install missing packages (see below); versions
#   pytest  tests/test_kernels.py + tests/test_model_pallas.py with the GPU as JAX's default
#           backend (junit xml + log). NB: test_matches_reference/test_tpu_* pass
#           interpret=True themselves, so on GPU only test_decode_shape and
#           test_model_pallas compile the Triton kernels for real; and
#           test_clear_errors[...pass interpret=True] assumes a CPU default backend.
#   parity  compiled (interpret=False) Triton flash attention vs xla_attention, fwd + grads,
#           at test and llama_110m-like shapes; checks a Triton/Mosaic-GPU call is in the HLO
#   attn    experiments/attention_bench.py as is. NB: its `jax_nn` row calls
#           jax.nn.dot_product_attention without `implementation=`, which is XLA, not cuDNN.
#   cudnn   the same script with a `cudnn` impl (implementation="cudnn") added by a wrapper
#           that patches the imported module (the script itself is not edited)
#   decode  `kvshare bench` (kvshare_jax/bench.py) on configs/llama_110m.py: standard,
#           pizza-bottom:6, lasagna-middle:6; the summary rescales its roofline (measured
#           read bandwidth) to the nominal HBM bandwidth $HBM_BW. NB: the accelerator default
#           lengths (512 + 1024) exceed llama_110m's max_len 1024, so lengths are passed.
#   train   experiments/train_throughput.py for the same three layouts; the wrapper patches
#           its `layouts` (no --layouts flag) and sets dtype=bfloat16 (no --dtype flag; its
#           markdown still says fp32). MFU = flops_per_token * tokens/s / $PEAK_FLOPS
#           (its cost model: full T x T attention scores, no causal halving).
#
# Packages: the GPU image (python3 with jax[cuda13], flax, optax, orbax, ...) lacks
# ml_collections, grain, array_record and portpicker. Carry build/gpu_wheels (cp312 wheels,
# ignored by git; make them here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d build/gpu_wheels \
#     ml_collections grain array_record portpicker
# ) and they are installed offline into a --target dir on PYTHONPATH. Only if
# `import jax; jax.default_backend()=='gpu'` fails is `pip install -e ".[cuda]"` tried
# (it needs a package index, which the GPU machine cannot reach).
set -u -o pipefail

DRY_RUN="${DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ -n "${OUT:-}" ]; then PACK=1; else PACK=0; OUT="$REPO/experiments/results/gpu"; fi
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
if [ "$PACK" = 1 ]; then RAW="${RAW:-$WORK/raw}"; else RAW="${RAW:-$OUT}"; fi
mkdir -p "$RAW"
exec > >(tee "$OUT/gpu_check.log") 2>&1

HBM_BW="${HBM_BW:-4.8e12}"          # H200 HBM3e, bytes/s
PEAK_FLOPS="${PEAK_FLOPS:-989e12}"  # H200 dense bf16 FLOP/s
export HBM_BW PEAK_FLOPS DRY_RUN RAW OUT
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache"
if [ "$DRY_RUN" = 1 ]; then
  BUDGET_S="${BUDGET_S:-600}"
  export JAX_PLATFORMS=cpu
else
  BUDGET_S="${BUDGET_S:-480}"   # 8 minutes, all stages together
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda,cpu}"  # never cpu alone: conftest defaults to it
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # pytest workers share the GPU
fi
RESERVE_S=20  # kept for the summary and packing
STATUS="$RAW/stages.tsv"; : >"$STATUS"
FAILED=0

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "import jax" 2>/dev/null; then
  PY="$REPO/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

pack() {
  if [ "$PACK" = 1 ]; then
    tar -czf "$OUT/gpu_check_raw.tar.gz.tmp" -C "$RAW" . && mv "$OUT/gpu_check_raw.tar.gz.tmp" "$OUT/gpu_check_raw.tar.gz"
  fi
}

# stage NAME TIMEOUT_S CMD...: runs CMD (stdout+stderr -> $RAW/NAME.log) under timeout.
stage() {
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET_S - SECONDS - RESERVE_S))
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -lt 15 ]; then
    echo "== $name: SKIPPED (global budget ${BUDGET_S}s spent)"
    printf '%s\tskipped\t0\t-\n' "$name" >>"$STATUS"; FAILED=1; return
  fi
  echo "== $name (timeout ${limit}s): $*" | cut -c1-300
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$RAW/$name.log" 2>&1; rc=$?
  local dt=$((SECONDS - t0)) verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict=timeout; elif [ "$rc" -ne 0 ]; then verdict=failed; fi
  [ "$verdict" = ok ] || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$verdict" "$dt" "$rc" >>"$STATUS"
  echo "   -> $verdict (rc $rc, ${dt}s); last lines of $name.log:"
  grep -v -e '^\s*$' -e 'Warning' "$RAW/$name.log" | tail -n 3 | cut -c1-200 | sed 's/^/      /'
  pack
}

# ------------------------------------------------------------------ env / install
cat >"$WORK/env.sh" <<'EOF'
set -u
echo "python: $PY ($("$PY" --version 2>&1))"
if [ "$DRY_RUN" != 1 ] && ! "$PY" -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  echo "jax has no GPU backend: pip install -e .[cuda] (needs a package index)"
  "$PY" -m pip install -q -e ".[cuda]" || echo "pip install -e .[cuda] failed"
fi
if ! "$PY" -c "import ml_collections, grain, kvshare_jax.train" 2>/dev/null; then
  if ls build/gpu_wheels/*.whl >/dev/null 2>&1; then
    echo "installing build/gpu_wheels offline into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" build/gpu_wheels/*.whl || echo "wheel install failed"
  else
    echo "missing ml_collections/grain and no build/gpu_wheels to install from"
  fi
fi
"$PY" - <<'PY'
import importlib, jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
for m in ("jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain", "etils",
          "pytest", "xdist", "kvshare_jax.train", "kvshare_jax.bench"):
    try:
        mod = importlib.import_module(m); print(f"{m:20s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001
        print(f"{m:20s} MISSING: {type(e).__name__}: {e}")
import kvshare_jax.train, kvshare_jax.bench  # noqa: F401,E401 - fail the stage if missing
PY
EOF
export PY SITE="$WORK/site"
export PYTHONPATH="$PYTHONPATH:$SITE"  # after the repo: only adds what is missing
echo "gpu_check: dry_run=$DRY_RUN out=$OUT raw=$RAW python=$PY budget=${BUDGET_S}s"
if command -v nvidia-smi >/dev/null; then timeout 20 nvidia-smi | tee "$RAW/nvidia-smi.txt"; else echo "no nvidia-smi here"; fi
stage env 90 bash "$WORK/env.sh"

# ------------------------------------------------------------------ a) Pallas tests
if [ "$DRY_RUN" = 1 ]; then
  PYTEST_ARGS=(-k "(causal-g1 and not tpu) or decode_shape or block_and_head or lasagna")
else
  PYTEST_ARGS=()
  "$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS=(-n 8)
fi
stage pytest 150 "$PY" -m pytest -p no:cacheprovider -q tests/test_kernels.py \
  tests/test_model_pallas.py "${PYTEST_ARGS[@]}" --junitxml="$RAW/pytest_kernels.xml"

cat >"$WORK/parity.py" <<'EOF'
"""Compiled Pallas (Triton on GPU) flash attention vs xla_attention: fwd and grads."""
import json, os, time
import jax, jax.numpy as jnp, numpy as np
from kvshare_jax.attention import xla_attention
from kvshare_jax.kernels import pallas_attention

gpu = jax.default_backend() == "gpu"
# b, t, s, n, kh, h, dtype, strict, window
cases = [(3, 21, 40, 4, 2, 20, "float32", True, 9), (2, 256, 256, 8, 2, 64, "bfloat16", False, None),
         (2, 1024, 1024, 12, 6, 64, "bfloat16", True, None),  # llama_110m heads
         (1, 2048, 2048, 32, 4, 128, "bfloat16", False, 512), (4, 1, 700, 12, 6, 64, "bfloat16", True, None)]
if not gpu:
    cases = [(2, 9, 17, 4, 2, 16, "float32", True, 5)]
rows, ok = [], True
for b, t, s, n, kh, h, dt, strict, window in cases:
    ks = jax.random.split(jax.random.key(0), 4)
    q, ct = (jax.random.normal(x, (b, t, n, h), jnp.dtype(dt)) for x in (ks[0], ks[3]))
    k, v = (jax.random.normal(x, (b, s, kh, h), jnp.dtype(dt)) for x in ks[1:3])
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + s - t, (b, t))
    kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

    def fwd_bwd(fn):
        def f(q, k, v, ct):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_pos, kv_pos, strict=strict, window=window), q, k, v)
            return (out, *vjp(ct))
        return jax.jit(f)

    kernel = fwd_bwd(lambda *a, **kw: pallas_attention(*a, **kw, interpret=not gpu))
    t0 = time.perf_counter()
    lowered = kernel.lower(q, k, v, ct)
    hlo = lowered.as_text()
    got = lowered.compile()(q, k, v, ct)
    want = fwd_bwd(xla_attention)(q, k, v, ct)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    errs = {name: float(np.abs(f32(g) - f32(w)).max() / (np.abs(f32(w)).max() + 1e-30))
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}
    tol = 1e-3 if dt == "float32" else 2e-2
    row = dict(shape=[b, t, s, n, kh, h], dtype=dt, strict=strict, window=window, interpret=not gpu,
               gpu_kernel_in_hlo=any(x in hlo.lower() for x in ("triton", "mosaic_gpu")), rel_err=errs, seconds=time.perf_counter() - t0)
    row["ok"] = all(np.isfinite(e) and e < tol for e in errs.values()) and (row["gpu_kernel_in_hlo"] or not gpu)
    ok &= row["ok"]
    rows.append(row); print(json.dumps(row), flush=True)
with open(os.path.join(os.environ["RAW"], "kernel_parity.json"), "w") as f:
    json.dump(dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind, rows=rows), f, indent=2)
raise SystemExit(0 if ok else 1)
EOF
stage parity 60 "$PY" "$WORK/parity.py"

# ------------------------------------------------------------------ b) attention bench
if [ "$DRY_RUN" = 1 ]; then ATTN=(--small); CUDNN_IMPLS=(cudnn); else ATTN=(); CUDNN_IMPLS=(pallas cudnn); fi
stage attn 90 "$PY" experiments/attention_bench.py "${ATTN[@]}" --out-dir "$RAW/attn"

cat >"$WORK/attn_cudnn.py" <<'EOF'
"""experiments/attention_bench.py plus an impl 'cudnn' (the script's jax_nn row is XLA)."""
import functools, sys
import jax
sys.path.insert(0, "experiments")
import attention_bench as ab

ab.IMPLS = (*ab.IMPLS, "cudnn")
_attention_fn = ab.attention_fn
def attention_fn(impl, args):
    if impl == "cudnn":
        return functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    return _attention_fn(impl, args)
ab.attention_fn = attention_fn
ab.main(sys.argv[1:])
EOF
stage cudnn 60 "$PY" "$WORK/attn_cudnn.py" "${ATTN[@]}" --impls "${CUDNN_IMPLS[@]}" --out-dir "$RAW/attn_cudnn"

# ------------------------------------------------------------------ c) decode vs roofline
if [ "$DRY_RUN" = 1 ]; then
  DEC=(--config configs/tiny.py --layouts standard,pizza-bottom:2,lasagna-middle:2 --batch-sizes 1,2
       --prompt-len 8 --gen-len 8 --warmup 0 --repeats 1)
else
  DEC=(--config configs/llama_110m.py --layouts standard,pizza-bottom:6,lasagna-middle:6
       --batch-sizes 1,64 --prompt-len 128 --gen-len 256 --warmup 1 --repeats 3)
fi
stage decode 150 "$PY" -m kvshare_jax.cli bench "${DEC[@]}" --out-dir "$RAW" --name decode --quiet

# ------------------------------------------------------------------ d) train-step MFU
cat >"$WORK/train_mfu.py" <<'EOF'
"""experiments/train_throughput.py for $TT_LAYOUTS only, compute dtype $TT_DTYPE."""
import os, sys
sys.path.insert(0, "experiments")
import train_throughput as tt

tt.layouts = lambda kv_layers: os.environ["TT_LAYOUTS"].split(",")
_run_config = tt.run_config
def run_config(args, layout):
    config = _run_config(args, layout)
    config.model.dtype = os.environ.get("TT_DTYPE", "bfloat16")
    return config
tt.run_config = run_config
tt.main(sys.argv[1:])
EOF
if [ "$DRY_RUN" = 1 ]; then
  export TT_LAYOUTS=standard,pizza-bottom:2,lasagna-middle:2 TT_DTYPE=float32
  TRAIN=(--layers 4 --kv-layers 2 --d-model 64 --heads 2 --d-ff 128 --vocab 256 --seq 32 --batch 2
         --warmup 1 --steps 1)
else
  export TT_LAYOUTS=standard,pizza-bottom:6,lasagna-middle:6 TT_DTYPE=bfloat16
  TRAIN=(--layers 12 --kv-layers 6 --d-model 768 --heads 12 --d-ff 2048 --vocab 32000 --seq 1024
         --batch 16 --warmup 2 --steps 5)
fi
stage train 120 "$PY" "$WORK/train_mfu.py" "${TRAIN[@]}" --out-dir "$RAW/train"

# ------------------------------------------------------------------ summary
cat >"$WORK/summary.py" <<'EOF'
import glob, json, os
import xml.etree.ElementTree as ET
raw, out = os.environ["RAW"], os.environ["OUT"]
hbm, peak = float(os.environ["HBM_BW"]), float(os.environ["PEAK_FLOPS"])
L = ["# GPU check summary", "", "| stage | verdict | seconds | rc |", "|---|---|---|---|"]
L += ["| " + " | ".join(line.rstrip("\n").split("\t")) + " |" for line in open(f"{raw}/stages.tsv")]
def load(pattern):
    hits = sorted(glob.glob(os.path.join(raw, pattern)))
    return json.load(open(hits[0])) if hits else None
try:
    ts = ET.parse(f"{raw}/pytest_kernels.xml").getroot().iter("testsuite").__next__()
    bad = [c.get("name") for c in ts.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    L += ["", f"pytest: {ts.get('tests')} tests, {ts.get('failures')} failures, {ts.get('errors')} errors, "
          f"{ts.get('skipped')} skipped" + (f"; failed: {', '.join(bad)}" if bad else "")]
except (OSError, ET.ParseError, StopIteration) as e:
    L += ["", f"pytest: no junit xml ({e})"]
if p := load("kernel_parity.json"):
    L += ["", f"compiled-kernel parity ({p['backend']}): " + "; ".join(
        f"{r['shape']} {r['dtype']} {'ok' if r['ok'] else 'FAIL'} max rel err "
        f"{max(r['rel_err'].values()):.1e} gpu_kernel={r['gpu_kernel_in_hlo']}" for r in p["rows"])]
rows = [r for pat in ("attn/attention_bench_*.json", "attn_cudnn/attention_bench_*.json")
        if (a := load(pat)) for r in a["results"] if not (pat.startswith("attn_cudnn") and r["impl"] == "pallas")]
if rows:
    L += ["", "attention (ms; jax_nn = jax.nn.dot_product_attention default = XLA):", "",
          "| seq | h | mode | impl | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    L += [f"| {r['seq']} | {r['head_dim']} | {r['mode']} | {r['impl']} | " + (
          f"{r['ms']:.3f} | {r['tflops']:.4g} |" if "ms" in r else f"{r['error'][:60]} | |") for r in rows]
if d := load("decode.json"):
    bw = d["meta"].get("read_bandwidth_bytes_s")
    L += ["", f"decode (prompt {d['meta']['prompt_len']}, gen {d['meta']['gen_len']}; measured read bw "
          f"{(bw or 0) / 1e12:.2f} TB/s; roofline at HBM {hbm / 1e12:.1f} TB/s):", "",
          "| layout | batch | decode tok/s | step ms | roofline tok/s | % of HBM roofline | % of measured-bw roofline |",
          "|---|---|---|---|---|---|---|"]
    for row in d["rows"]:
        for r in row["runs"]:
            nbytes = r.get("roofline_step_s", 0) * (bw or 0)
            roof_s = nbytes / hbm
            L += [f"| {row['layout']} | {r['batch']} | {r['decode_tok_s']:.0f} | {r['decode_step_s'] * 1e3:.3f} | "
                  f"{r['batch'] / roof_s if roof_s else float('nan'):.0f} | {100 * roof_s / r['decode_step_s']:.3g}% | {100 * r.get('roofline_fraction', float('nan')):.3g}% |"]
if t := load("train/train_throughput_*.json"):
    L += ["", f"train step (dtype {os.environ.get('TT_DTYPE')}; MFU vs {peak / 1e12:.0f} TFLOP/s, "
          "train_throughput.py's FLOP model):", "", "| layout | step ms | tokens/s | MFU |", "|---|---|---|---|"]
    L += [f"| {r['layout']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
          f"{100 * r['flops_per_token'] * r['tokens_per_s'] / peak:.3g}% |" for r in t["rows"]]
text = "\n".join(L) + "\n"
open(f"{out}/summary.md", "w").write(text)
if raw != out:
    open(f"{raw}/summary.md", "w").write(text)
print(text)
EOF
echo "== summary"
"$PY" "$WORK/summary.py" || { echo "summary failed"; FAILED=1; }
if [ "$PACK" = 1 ]; then
  for f in "$RAW"/attn/attention_bench_*.md "$RAW"/decode.md "$RAW"/train/train_throughput_*.md; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  pack
fi
echo "gpu_check: $([ "$FAILED" = 0 ] && echo all stages ok || echo SOME STAGES FAILED) in ${SECONDS}s; files in $OUT:"
ls "$OUT"
exit "$FAILED"
