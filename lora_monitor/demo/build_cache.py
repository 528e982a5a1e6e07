"""Build a demo folder once: reuse it while its recipe matches, else rebuild it beside and swap it in."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RECIPE_FILE = "recipe.json"


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_once(directory: Path, recipe: dict[str, Any], write: Callable[[Path], object]) -> Path:
    """Reuse `directory` if it holds this recipe; else build into a temporary sibling and move it in place.

    Building beside the target and renaming keeps a half-written folder from ever looking complete; the
    caller's torch random state is left as it was.
    """
    directory = Path(directory)
    if _read_json(directory / RECIPE_FILE) == recipe:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            write(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1, sort_keys=True), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
