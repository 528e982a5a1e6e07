"""Sharing the CPU between kohya and the evaluator when `train` runs both on it.

Left alone, torch in each process starts one OpenMP thread per core, so on n cores 2n busy threads fight and
every parallel region waits at its barrier for a thread that is not running: a real kohya run went from
1.5 s/step alone to 53 s/step while an evaluation ran. So when both train on the CPU the cores are split:

- the evaluator gets a quarter of the cores (at least one), kohya the rest (at least one): on 2 cores one
  each, on 8 cores 6 + 2, on 16 cores 12 + 4. Training is the run's purpose, so it keeps most of the machine
  and is slowed at most by the evaluator's share (2 cores: at most 2x; 8 cores: at most 8/6).
- kohya's count goes to its child as OMP_NUM_THREADS and MKL_NUM_THREADS (`accelerate launch` passes
  OMP_NUM_THREADS on). A count the user set (either variable in the environment, or [kohya.accelerate]
  num_cpu_threads_per_process) is kept, and the evaluator gets the cores left over.
- the evaluator's thread runs at a lower priority (nice +EVAL_NICE, Linux: per thread, and the OpenMP threads
  it starts inherit it), so whenever both want a core kohya gets it; the monitor's own thread is not lowered,
  so reading kohya's output and writing rows keep their speed.

With kohya on a GPU (one is visible) its threads are left alone and the evaluator keeps torch's default; the
evaluator's priority is lowered whenever it runs on the CPU, so it never takes CPU time from kohya's feeding
of the GPU either.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_monitor.config import KohyaConfig

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
EVAL_NICE = 10  # nice +10: about a tenth of a contended core's time against a nice-0 thread
FALSE_WORDS = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class CpuShare:
    """How `train` shares the CPU: None leaves a side's thread count alone."""

    kohya_threads: int | None = None  # set in kohya's environment
    eval_threads: int | None = None  # torch.set_num_threads in the evaluator's thread
    eval_nice: int = 0  # added to the evaluator thread's niceness

    def describe(self) -> str | None:
        if self.eval_threads is None:
            return None
        kohya = "as set by you" if self.kohya_threads is None else str(self.kohya_threads)
        return (f"kohya and the evaluator share the CPU: kohya {kohya} thread(s), the evaluator "
                f"{self.eval_threads} at lower priority")


def usable_cores() -> int:
    """The cores this process may run on (taskset/cpuset), else all of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def split(cores: int, kohya_threads: int | None = None) -> tuple[int, int]:
    """(kohya's threads, the evaluator's threads) on `cores`; `kohya_threads`: a count the user chose."""
    if kohya_threads is not None:
        return kohya_threads, max(1, cores - kohya_threads)
    evaluator = max(1, cores // 4)
    return max(1, cores - evaluator), evaluator


def user_threads(kohya: KohyaConfig, environ: Mapping[str, str]) -> tuple[bool, int | None]:
    """Did the user choose kohya's thread count, and which (None when it is not a plain count)?"""
    chosen = kohya.accelerate.get("num_cpu_threads_per_process") if kohya.launcher == "accelerate" else None
    if chosen is None:
        chosen = next((environ[v] for v in THREAD_VARS if environ.get(v, "").strip()), None)
    if chosen is None:
        return False, None
    try:
        count = int(str(chosen).strip())
    except ValueError:
        return True, None
    return True, count if count >= 1 else None


def kohya_on_cpu(kohya: KohyaConfig, environ: Mapping[str, str]) -> bool:
    """Does kohya train on the CPU? accelerate picks a visible GPU unless told to use the CPU."""
    if kohya.launcher == "accelerate" and kohya.accelerate.get("cpu") not in (None, False):
        return True
    if environ.get("ACCELERATE_USE_CPU", "").strip().lower() not in FALSE_WORDS:
        return True
    if environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return True
    return not gpu_present()


def gpu_present() -> bool:
    """A GPU kohya's own torch could use: seen by this torch, or a driver present (kohya's venv may have a
    CUDA torch where lora-monitor's has none)."""
    import torch

    if torch.cuda.is_available():
        return True
    nvidia = Path("/proc/driver/nvidia/gpus")
    if nvidia.is_dir() and any(nvidia.iterdir()):
        return True
    if Path("/dev/kfd").exists():  # ROCm
        return True
    mps = getattr(torch.backends, "mps", None)
    return sys.platform == "darwin" and mps is not None and mps.is_available()


def plan(kohya: KohyaConfig, eval_on_cpu: bool, environ: Mapping[str, str], cores: int) -> CpuShare:
    """The share for a `train` run whose evaluator runs on the CPU (`eval_on_cpu`) or not."""
    if not eval_on_cpu:
        return CpuShare()
    if not kohya_on_cpu(kohya, environ):
        return CpuShare(eval_nice=EVAL_NICE)
    chosen, count = user_threads(kohya, environ)
    kohya_n, evaluator = split(cores, count)
    return CpuShare(kohya_threads=None if chosen else kohya_n, eval_threads=evaluator, eval_nice=EVAL_NICE)


def kohya_env(share: CpuShare) -> dict[str, str]:
    """Variables to add to kohya's environment."""
    if share.kohya_threads is None:
        return {}
    return {name: str(share.kohya_threads) for name in THREAD_VARS}


def lower_this_thread(nice: int) -> None:
    """Lower the calling thread's priority by `nice` (Linux: per thread; elsewhere nothing, since
    PRIO_PROCESS there would lower the whole monitor)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.info("could not lower the evaluator's priority: %s", exc)
