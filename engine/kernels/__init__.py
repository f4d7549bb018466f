"""C++ kernels for the CPU engine, compiled on the machine that runs them.

`paged_attention.cpp` holds `torch.ops.pdserve.paged_decode_attention`: decode attention that reads
K/V blocks where they lie in the paged cache (no gather into a contiguous copy), and
`paged_prefill_attention`, the same for prefill chunks (causal, over earlier context and the chunk). It is compiled with
`-O3 -march=native` into `<build_root>/<key>/`, where the key hashes the source, the torch version,
the compiler and this CPU's feature flags: a new source, torch or CPU builds anew, anything else
loads the cached library. The first build takes ~20 s (measured on 2 cores); `python -m
pdserve.engine.kernels` does it ahead of time (`make install` runs it), so workers only load it.

The build is one compiler call (no ninja, which torch's own JIT loader needs on PATH), into a
temporary file renamed into place, under an exclusive `flock` on the key's directory: concurrent
first use from several processes (Ray workers) builds once, the others wait and load the result, and
a builder that is killed releases the lock with its process (torch's file baton would be left
behind, and every later loader would wait on it forever).

The engine reaches them through its attention backend (`engine.attention.CpuKernelBackend`, chosen by
`EngineConfig.attention_backend`). `prefill_attention_kernel` picks the prefill attention from the same
library: its paged prefill kernel (bf16, built where the CPU has AVX-512-BF16), or None for the torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pdserve.engine.config import default_cache_dir
from pdserve.engine.platform import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# Cache dtypes the kernel computes on (in fp32 either way).
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
CXXFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c++20", "-shared")


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded here (no compiler, a compile error, a bad library)."""


def default_build_root() -> Path:
    return default_cache_dir() / "kernels"


def build_key(source: Path = SOURCE, compiler: str = "c++") -> str:
    """What the compiled library depends on: the source, torch, the compiler, this CPU's ISA."""
    h = hashlib.sha256()
    for part in (source.read_bytes(), torch.__version__.encode(), compiler.encode(), sys.version.encode(),
                 " ".join(sorted(cpu_flags())).encode(), " ".join(CXXFLAGS).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _compile_command(compiler: str, source: Path, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    cmd = [compiler, *CXXFLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    for inc in cpp_extension.include_paths():
        cmd += ["-isystem", inc]
    cmd += [str(source), "-o", str(output)]
    for lib in cpp_extension.library_paths():
        cmd.append(f"-L{lib}")
    # libgomp resolves to the copy torch already loaded (same soname): one OpenMP runtime, torch's pool.
    return cmd + ["-lc10", "-ltorch_cpu"]


def build(build_root: Path | None = None, source: Path = SOURCE, compiler: str = "c++") -> tuple[Path, float]:
    """The compiled library for this machine, built if it is not cached: (path, seconds spent building,
    0 when cached). Raises `KernelBuildError`."""
    import fcntl

    key = build_key(source, compiler)
    out_dir = (build_root or default_build_root()) / key
    lib = out_dir / f"pdserve_{source.stem}.so"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process exits, however it exits
            if lib.exists():
                return lib, 0.0
            tmp = out_dir / f".{lib.name}.{os.getpid()}.tmp"
            cmd = _compile_command(compiler, source, tmp)
            logger.info("compiling %s for this CPU (once per machine): %s", source.name, " ".join(cmd))
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise KernelBuildError(f"{compiler} failed on {source.name} (exit {proc.returncode}):\n"
                                       f"{proc.stderr[-4000:]}")
            tmp.replace(lib)  # atomic: a reader sees no library or a whole one
            seconds = time.perf_counter() - t0
            logger.info("compiled %s in %.1f s into %s", source.name, seconds, lib)
            return lib, seconds
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot build {source.name} with {compiler!r}: {e}") from e


def _registered() -> Callable | None:
    try:
        return torch.ops.pdserve.paged_decode_attention
    except (AttributeError, RuntimeError):
        return None


_loaded: dict[str, Callable] = {}  # build key -> the op, in this process
# build key -> why it failed, in this process: a compiler that failed once fails again, and each try costs
# seconds (the GEMM and the attention backend both ask for the library while a worker starts)
_failed: dict[str, KernelBuildError] = {}


def load(build_root: Path | None = None, source: Path = SOURCE, compiler: str = "c++") -> Callable:
    """`torch.ops.pdserve.paged_decode_attention`, built (if not cached) and loaded on first use in this
    process. A process registers the op once: a library built from the same source elsewhere (another
    build root) is not loaded a second time. Raises `KernelBuildError`, and raises it again without a second
    build when asked again in this process."""
    key = build_key(source, compiler)
    if key in _loaded:
        return _loaded[key]
    if key in _failed:
        raise KernelBuildError(str(_failed[key]))
    try:
        op = _load(build_root, source, compiler)
    except KernelBuildError as e:
        _failed[key] = e
        raise
    _loaded[key] = op
    return op


def _load(build_root: Path | None, source: Path, compiler: str) -> Callable:
    lib, _ = build(build_root, source, compiler)
    op = _registered()
    if op is None:
        try:
            torch.ops.load_library(str(lib))
        except (OSError, RuntimeError) as e:
            raise KernelBuildError(f"cannot load {lib}: {e}") from e
        op = _registered()
        if op is None:
            raise KernelBuildError(f"{lib} registered no pdserve::paged_decode_attention")
    return op


def prefill_attention_kernel(decode_kernel: Callable | None, dtype: torch.dtype, head_dim: int,
                             group: int) -> Callable | None:
    """`torch.ops.pdserve.paged_prefill_attention` where it runs: the library is loaded (the decode kernel
    is in use, so `attention_backend` allows it) and was built for AVX-512-BF16, the cache is bf16, and
    the head shape is one it is compiled for. None keeps the torch prefill path (gather + SDPA)."""
    if decode_kernel is None or dtype != torch.bfloat16:
        return None
    ops = torch.ops.pdserve
    if not ops.paged_prefill_attention_supported(dtype, head_dim, group):
        return None
    return ops.paged_prefill_attention
