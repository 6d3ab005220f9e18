"""Probes of the machine a benchmark runs on: its devices, its CPU, the best wall time of
a program and the streaming read bandwidth (the decode roofline's denominator).

Used by ``kvshare bench`` (``bench.py``), the study report and the experiments.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def device_info() -> dict[str, Any]:
    """Platform, kind and count of the devices, host CPUs and the jax version."""
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_time(
    fn: Callable[..., Any],
    *,
    warmup: int,
    repeats: int,
    setup: Callable[[], Any] | None = None,
) -> float:
    """Best wall time of ``fn()`` (blocked until ready) over ``repeats`` calls after
    ``warmup`` untimed ones. With ``setup``, each call is ``fn(setup())``, the setup
    untimed and ready first (e.g. a fresh cache for a program that donates it)."""

    def once() -> float:
        args = () if setup is None else (jax.block_until_ready(setup()),)
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return min(once() for _ in range(repeats))


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Streaming read bandwidth in bytes/s over ``nbytes`` of fp32 (far beyond any cache),
    best of ``repeats`` per program: an XLA column sum, an XLA row-wise matrix-vector
    product and, on CPU, the matvec kernel of batch-1 decode (``kernels/cpu_matvec.py``).
    ``best`` is the largest: the bandwidth of the decode roofline."""
    from kvshare_jax.kernels import cpu_matvec

    a = jnp.ones((nbytes // 4 // 512, 512), jnp.float32)
    vec = jnp.ones((512,), jnp.float32)
    column_sum, rowwise = jax.jit(lambda a: jnp.sum(a, axis=0)), jax.jit(lambda a, v: a @ v)
    programs = {"sum": lambda: column_sum(a), "gemv": lambda: rowwise(a, vec)}
    if jax.default_backend() == "cpu" and cpu_matvec.available():
        row, matvec = jnp.ones((1, a.shape[0]), jnp.float32), jax.jit(cpu_matvec.matvec)
        programs["matvec"] = lambda: matvec(row, a)
    out = {name: a.nbytes / best_time(f, warmup=1, repeats=repeats) for name, f in programs.items()}
    out["best"] = max(out.values())
    return out
