"""Folders lora-monitor may not write, as an unprivileged user really meets them.

CI runs as root, and root ignores permission bits, so these tests run the CLI as `nobody` through `setpriv`
(util-linux) instead of injecting EROFS: the kernel refuses the writes, not a patched function.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import write_config

NOBODY = 65534
SETPRIV = shutil.which("setpriv")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None,
    reason="needs root and setpriv to drop to an unprivileged user (CI has both)",
)


@pytest.fixture(scope="module", autouse=True)
def nobody_can_run_lora_monitor() -> None:
    """The interpreter and this checkout must be readable by `nobody` (a checkout in a private home folder is
    not); otherwise these tests say so and skip rather than fail for a reason that is not lora-monitor's."""
    assert SETPRIV is not None
    probe = subprocess.run([SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                            "-c", "import lora_monitor.cli"], cwd=tempfile.gettempdir(), capture_output=True,
                           text=True, timeout=120, env={**os.environ, "HOME": tempfile.gettempdir()})
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"user nobody cannot run {sys.executable} with this checkout ({last})")


@pytest.fixture()
def open_dir() -> Iterator[Path]:
    """A folder `nobody` can read (pytest's own tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="lora-monitor-perm-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _readable_assets(assets: Any, into: Path) -> Any:
    """The demo's models and data copied where `nobody` can read them."""
    root = Path(assets.base_model).parents[1]
    shutil.copytree(root, into / "assets")
    _open_to_all(into / "assets")

    def moved(p: Path) -> Path:
        return into / "assets" / Path(p).relative_to(root)

    return dataclasses.replace(assets, base_model=moved(assets.base_model),
                               train_data_dir=moved(assets.train_data_dir), prompts=moved(assets.prompts),
                               fashion_clip=moved(assets.fashion_clip), dino=moved(assets.dino))


def _open_to_all(top: Path) -> None:
    """chmod -R a+rX: readable by all, folders enterable."""
    for path in [top, *top.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _as_nobody(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    argv = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-m", "lora_monitor.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, text=True, capture_output=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _read_only(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)  # owned by root: nobody may list it, not write in it


def test_train_into_a_read_only_folder_is_one_line_and_nothing_starts(open_dir: Path, demo_assets: Any) -> None:
    assets = _readable_assets(demo_assets, open_dir)
    config = write_config(open_dir / "run", assets)
    _open_to_all(open_dir / "run")
    _read_only(open_dir / "run" / "output")
    result = _as_nobody("train", "--config", str(config), cwd=open_dir / "run")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "output" in lines[0] and "not writable" in lines[0], result.stderr
    assert list((open_dir / "run" / "output").iterdir()) == []  # kohya never started, nothing half-written


def test_eval_dir_of_a_read_only_folder_is_one_line(open_dir: Path, demo_assets: Any) -> None:
    assets = _readable_assets(demo_assets, open_dir)
    config = write_config(open_dir / "run", assets)
    folder = open_dir / "run" / "output"
    folder.mkdir()
    weights = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    save_file(weights, str(folder / "demo-step00000010.safetensors"))
    _open_to_all(open_dir / "run")
    folder.chmod(0o555)
    result = _as_nobody("eval-dir", str(folder), "--config", str(config), cwd=open_dir / "run")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(folder) in lines[0] and "Permission denied" in lines[0], result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["demo-step00000010.safetensors"]
