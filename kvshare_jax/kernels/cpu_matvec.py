"""Few-row fp32 matrix products on XLA:CPU through an FFI kernel (decode).

``matvec(x [.., K], w [K, N]) -> [.., N]`` for up to :data:`KERNEL_ROWS` rows of ``x``;
the model sends it products of at most :func:`max_rows` rows. At batch 1 a decode step
is bound by reading the weights; XLA:CPU's dot reaches about 40 GB/s on those shapes
where a row-split streaming loop reaches the ~50 GB/s of a plain read on the same 2 cores
(``cpu_matvec.cc`` says how). Batch decode (8..32 rows) depends on the ISA: on AVX-512
hosts XLA's dots run near the core's peak and beat 256-bit loops from two rows on, so
only single rows come here; on AVX2-only hosts (a Zen 3 core) XLA's dots of 4..32 rows
reach 10-26 GFLOP/s, while the kernel sweeps up to 8 rows across the weight rows (read
front to back, as for one row) and computes more rows in register-blocked tiles (6 rows
x 16 columns, the columns split between the threads) at 70-125 GFLOP/s
(``experiments/results/matvec_bench_cpu*.md``).
:func:`dot_general` is the drop-in ``dot_general`` of the model's ``nn.Dense`` layers
(``matvec_impl="auto"``): it takes the kernel when the product is ``[.., K] x [K, N]`` in
fp32 with at most :func:`max_rows` rows, the target platform is the CPU and no
multi-device mesh is active; everything else, and a program lowered for another
platform, is ``lax.dot_general``. The kernel has a custom VJP with XLA dots, so
gradients through it are the usual ones.

The library is compiled at first use from ``cpu_matvec.cc`` with the host C++ compiler
(``$CXX``, else ``c++``; ``-O3 -march=native``, with ``KVSHARE_CPU_ISA=avx2`` also
``-mno-avx512f``: the AVX2 build on an AVX-512 host) into ``$XDG_CACHE_HOME/kvshare_jax``
(else ``~/.cache/kvshare_jax``), keyed by the source, the flags, the compiler, JAX and
the CPU. Without a compiler, or with ``KVSHARE_CPU_MATVEC=0``, :func:`available` is False
and every product stays on XLA (one warning says why). ``KVSHARE_MATVEC_THREADS`` sets
its threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kvshare_jax.target import target_platform

# rows sent to the kernel (results/matvec_bench_cpu*.md): on AVX-512 hosts XLA's dots beat
# 256-bit loops from 2 rows on; with AVX2 only (a Zen 3 core) the kernel is faster than
# XLA's dots up to 32 rows
MAX_ROWS_AVX512 = 1
MAX_ROWS_AVX2 = 32
KERNEL_ROWS = 64  # what cpu_matvec.cc accepts (kMaxRows)
_SOURCE = Path(__file__).with_suffix(".cc")
_TARGET = "kvshare_matvec"


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(x for x in lines if x.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "kvshare_jax"


def isa_flags() -> list[str]:
    """The ISA flags of the build: ``-march=native``, capped by ``KVSHARE_CPU_ISA``."""
    isa = os.environ.get("KVSHARE_CPU_ISA", "native").lower()
    if isa not in ("native", "avx2"):
        raise RuntimeError(f"KVSHARE_CPU_ISA={isa!r}: expected native or avx2")
    return ["-march=native"] + (["-mno-avx512f"] if isa == "avx2" else [])


def _build(cxx: str) -> Path:
    """Compiles the kernel library (once per source/flags/compiler/JAX/CPU), returns it."""
    include = jax.ffi.include_dir()
    flags = isa_flags()
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), cxx, *flags, jax.__version__, _cpu_id()]).encode()
    ).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_matvec-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, "-O3", *flags, "-std=c++17", "-shared", "-fPIC"]
        cmd += ["-I", include, str(_SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, lib)  # atomic: concurrent builders (pytest workers) race safely
    return lib


@functools.cache
def max_rows() -> int:
    """Most rows of a product the model sends to the kernel: :data:`MAX_ROWS_AVX2` when the
    kernel is built without AVX-512 (no ``avx512f`` on the host, or ``KVSHARE_CPU_ISA=avx2``),
    else :data:`MAX_ROWS_AVX512`."""
    avx512 = "avx512f" in _cpu_id() and "-mno-avx512f" not in isa_flags()
    return MAX_ROWS_AVX512 if avx512 else MAX_ROWS_AVX2


@functools.cache
def available() -> bool:
    """True when the kernel is built and registered with XLA:CPU (built on first call)."""
    if os.environ.get("KVSHARE_CPU_MATVEC", "1") == "0":
        return False
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX)")
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.KvshareMatvec), platform="cpu")
    except (OSError, RuntimeError) as e:
        warnings.warn(
            f"kvshare_jax CPU matvec kernel unavailable, using XLA dots: {e}", stacklevel=2
        )
        return False
    return True


def _kernel(x2: jax.Array, w: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(
        _TARGET,
        jax.ShapeDtypeStruct((x2.shape[0], w.shape[1]), jnp.float32),
        vmap_method="sequential",
    )
    return call(x2, w)


@jax.custom_vjp
def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [.., K] @ w [K, N]`` in fp32 through the kernel (``prod(x.shape[:-1]) <= 64``)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead))
    if not 1 <= rows <= KERNEL_ROWS or w.ndim != 2 or w.shape[0] != k:
        raise ValueError(
            f"matvec needs x [.., K] with 1..{KERNEL_ROWS} rows and w [K, N], "
            f"got x {x.shape}, w {w.shape}"
        )
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"matvec is float32 only, got x {x.dtype}, w {w.dtype}")
    y = _kernel(x.reshape(-1, k), w)
    return y.reshape(*lead, w.shape[1])


def _fwd(x: jax.Array, w: jax.Array):
    return matvec(x, w), (x, w)


def _bwd(res, g: jax.Array):
    x, w = res
    k = x.shape[-1]
    dx = g @ w.T
    dw = x.reshape(-1, k).T @ g.reshape(-1, w.shape[1])
    return dx, dw


matvec.defvjp(_fwd, _bwd)


def _single_device_cpu() -> bool:
    if target_platform() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def use_kernel(x: jax.Array, w: jax.Array) -> bool:
    """Whether ``x [.., K] @ w [K, N]`` goes to the kernel (see the module docstring)."""
    rows = int(np.prod(x.shape[:-1]))
    return (
        x.dtype == jnp.float32
        and w.dtype == jnp.float32
        and w.ndim == 2
        and 1 <= rows <= max_rows()
        and _single_device_cpu()
        and available()
    )


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` that sends few-row fp32 ``[.., K] x [K, N]`` to the kernel."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
    if plain and preferred_element_type in (None, jnp.float32) and use_kernel(lhs, rhs):
        # platform_dependent: a program lowered for another platform keeps the XLA dot
        return lax.platform_dependent(
            lhs,
            rhs,
            cpu=matvec,
            default=lambda a, b: lax.dot_general(a, b, dimension_numbers, precision),
        )
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
