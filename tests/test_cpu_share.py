"""cpu_share: how kohya and the evaluator split the CPU, and the evaluator thread's setup."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lora_monitor import cpu_share
from lora_monitor.config import KohyaConfig
from lora_monitor.cpu_share import EVAL_NICE, CpuShare, kohya_env, plan, split
from lora_monitor.evaluation.worker import EvalWorker

KOHYA = KohyaConfig(sd_scripts=Path("/sd-scripts"))
ACCELERATE = KohyaConfig(sd_scripts=Path("/sd-scripts"), launcher="accelerate")


@pytest.mark.parametrize(("cores", "chosen", "expected"), [
    (1, None, (1, 1)), (2, None, (1, 1)), (3, None, (2, 1)), (4, None, (3, 1)), (8, None, (6, 2)),
    (16, None, (12, 4)), (64, None, (48, 16)),
    (2, 2, (2, 1)), (16, 1, (1, 15)), (4, 8, (8, 1)),  # the user's count for kohya; the evaluator gets the rest
])
def test_split(cores: int, chosen: int | None, expected: tuple[int, int]) -> None:
    assert split(cores, chosen) == expected


@pytest.mark.parametrize(("kohya", "eval_on_cpu", "environ", "gpu", "expected"), [
    # both on the CPU: split, kohya's count goes into its environment
    (KOHYA, True, {}, False, CpuShare(1, 1, EVAL_NICE)),
    (KOHYA, True, {"CUDA_VISIBLE_DEVICES": ""}, True, CpuShare(1, 1, EVAL_NICE)),
    (KOHYA, True, {"CUDA_VISIBLE_DEVICES": "-1"}, True, CpuShare(1, 1, EVAL_NICE)),
    (KOHYA, True, {"ACCELERATE_USE_CPU": "true"}, True, CpuShare(1, 1, EVAL_NICE)),
    (KohyaConfig(sd_scripts=Path("/s"), launcher="accelerate", accelerate={"cpu": True}), True, {}, True,
     CpuShare(1, 1, EVAL_NICE)),
    # the user's own count is kept
    (KOHYA, True, {"OMP_NUM_THREADS": "2"}, False, CpuShare(None, 1, EVAL_NICE)),
    (KOHYA, True, {"MKL_NUM_THREADS": "1"}, False, CpuShare(None, 1, EVAL_NICE)),
    (KOHYA, True, {"OMP_NUM_THREADS": "4,2"}, False, CpuShare(None, 1, EVAL_NICE)),
    (KohyaConfig(sd_scripts=Path("/s"), launcher="accelerate", accelerate={"num_cpu_threads_per_process": 1}),
     True, {}, False, CpuShare(None, 1, EVAL_NICE)),
    # kohya on a GPU: its threads alone; the evaluator on the CPU only yields
    (KOHYA, True, {}, True, CpuShare(None, None, EVAL_NICE)),
    (KOHYA, True, {"CUDA_VISIBLE_DEVICES": "0", "ACCELERATE_USE_CPU": "0"}, True, CpuShare(None, None, EVAL_NICE)),
    (ACCELERATE, True, {}, True, CpuShare(None, None, EVAL_NICE)),
    # the evaluator on a GPU: nothing to share
    (KOHYA, False, {}, False, CpuShare()),
    (KOHYA, False, {}, True, CpuShare()),
])
def test_plan(monkeypatch: pytest.MonkeyPatch, kohya: KohyaConfig, eval_on_cpu: bool, environ: dict[str, str],
              gpu: bool, expected: CpuShare) -> None:
    monkeypatch.setattr(cpu_share, "gpu_present", lambda: gpu)
    assert plan(kohya, eval_on_cpu, environ, cores=2) == expected


def test_kohya_env() -> None:
    assert kohya_env(CpuShare(3, 1, EVAL_NICE)) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert kohya_env(CpuShare(None, 1, EVAL_NICE)) == {}
    assert kohya_env(CpuShare()) == {}


def _priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is Linux's")
def test_evaluator_thread_runs_lower_with_its_thread_count_and_the_monitor_does_not() -> None:
    import torch

    seen: dict[str, Any] = {}
    main_before, threads_before = _priority(), torch.get_num_threads()

    def load() -> Any:
        seen["priority"], seen["threads"] = _priority(), torch.get_num_threads()
        child = threading.Thread(target=lambda: seen.setdefault("child", _priority()))  # as OpenMP starts its own
        child.start()
        child.join()
        raise RuntimeError("no models in this test")

    worker = EvalWorker(load, lambda event: None, threads=1, nice=3)
    worker.start()
    worker.close(timeout=30)
    try:
        assert seen["threads"] == 1
        assert seen["priority"] == min(19, main_before + 3) == seen["child"]
        assert _priority() == main_before
    finally:
        torch.set_num_threads(threads_before)


def test_evaluator_without_a_share_keeps_torchs_threads() -> None:
    import torch

    seen: dict[str, int] = {}
    before = torch.get_num_threads()

    def load() -> Any:
        seen["threads"], seen["priority"] = torch.get_num_threads(), _priority()
        raise RuntimeError("no models in this test")

    worker = EvalWorker(load, lambda event: None)
    worker.start()
    worker.close(timeout=30)
    assert seen == {"threads": before, "priority": _priority()}
