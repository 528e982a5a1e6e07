"""Faults injected into a real `lora-monitor` process, for tests only.

Tests put this folder on PYTHONPATH and name the fault in LORA_MONITOR_TEST_FAULT; Python then imports this
file at start-up in the monitor and in every child (kohya's trainer included, which never imports the
modules patched here, so it trains untouched). Without the variable, nothing is patched. The product code
has no test branch: the faults are raised where the real ones come from (the diffusion pipeline's call,
the write of a CSV row).

  oom-over:N   every pipeline call with more than N images raises CUDA out of memory (N = 0: all of them)
  enospc-row:K the K-th CSV row written (the baseline is the first) fails with "No space left on device" (ENOSPC)
"""

from __future__ import annotations

import errno
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run `action(module)` once `name` has been imported (lazily: nothing heavy at start-up)."""

    def __init__(self, name: str, action: Callable[[ModuleType], None]) -> None:
        self.name, self.action = name, action

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        assert spec is not None and spec.loader is not None
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            self.action(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _oom_over(limit: int) -> Callable[[ModuleType], None]:
    def patch(evaluator: ModuleType) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        original = StableDiffusionPipeline.__call__

        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if len(kwargs["prompt_embeds"]) > limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return original(self, *args, **kwargs)

        StableDiffusionPipeline.__call__ = call

    return patch


def _enospc_row(nth: int) -> Callable[[ModuleType], None]:
    def patch(tracker: ModuleType) -> None:
        real = tracker.os
        rows = {"n": 0}

        class DiskFills:
            """The tracker's `os`, whose write of the nth row (after the header) fails as a full disk does."""

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def write(self, fd: int, data: bytes) -> int:
                if not data.startswith(b"step,epoch,"):  # the header is not a row
                    rows["n"] += 1
                    if rows["n"] == nth:
                        raise OSError(errno.ENOSPC, "No space left on device")
                return real.write(fd, data)

        tracker.os = DiskFills()

    return patch


def _install(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    if kind == "oom-over":
        sys.meta_path.insert(0, _AfterImport("lora_monitor.evaluation.evaluator", _oom_over(int(arg))))
    elif kind == "enospc-row":
        sys.meta_path.insert(0, _AfterImport("lora_monitor.tracking.tracker", _enospc_row(int(arg))))
    else:
        raise SystemExit(f"LORA_MONITOR_TEST_FAULT={fault!r}: unknown fault")


if os.environ.get("LORA_MONITOR_TEST_FAULT"):
    _install(os.environ["LORA_MONITOR_TEST_FAULT"])
