"""Pick the best evaluated checkpoint and publish it as `best.json` + `<output_name>-best.safetensors`.

Both files are replaced atomically (a temporary file in the same folder, then `os.replace`), so a reader
never sees a half-written file and a failure leaves the previous best in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_monitor.policies.early_stopping import METRIC_MODES

BEST_JSON = "best.json"
BEST_SUFFIX = "-best.safetensors"
# CSV columns that are not scores of the checkpoint.
_NOT_METRICS = {"step", "epoch", "timestamp", "checkpoint", "status", "note", "eval_seconds", "learning_rate"}


def best_file_name(output_name: str) -> str:
    """`<output_name>-best.safetensors`: a watcher of the output folder must not treat it as a checkpoint."""
    return f"{output_name}{BEST_SUFFIX}"


def _number(value: Any) -> float | None:
    """A CSV cell as a finite float; empty, unparsable or non-finite cells are None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _step(row: dict[str, Any]) -> int | None:
    number = _number(row.get("step"))
    return None if number is None else int(number)


def select_best(rows: list[dict[str, Any]], monitor: str, mode: str) -> dict[str, Any] | None:
    """The row with the best finite `monitor` value among rows whose status is "ok"; None if there is none.

    Cells may be strings (as read from the CSV) or numbers. On a tie the earlier step wins (the same score
    with less training), then the earlier row.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    sign = 1.0 if mode == "min" else -1.0
    best: tuple[float, float, int] | None = None
    best_row: dict[str, Any] | None = None
    for index, row in enumerate(rows):
        value = _number(row.get(monitor))
        if str(row.get("status", "")).strip() != "ok" or value is None:
            continue
        step = _step(row)
        key = (sign * value, math.inf if step is None else float(step), index)
        if best is None or key < best:
            best, best_row = key, row
    return best_row


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(path: Path) -> Path:
    # Hidden and ending in .tmp, so nothing that watches for *.safetensors or reads *.json picks it up.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _stage_checkpoint(checkpoint_path: Path, tmp: Path) -> None:
    """Put the checkpoint's bytes at `tmp`: a hard link (no copy, no extra disk) or else a full copy."""
    try:
        os.link(checkpoint_path, tmp)
        return
    except OSError:
        # Other file system, or one without hard links (some network and FAT mounts): copy instead.
        tmp.unlink(missing_ok=True)
    shutil.copyfile(checkpoint_path, tmp)


def best_record(best_row: dict[str, Any], rule: str) -> dict[str, Any]:
    """The content of best.json: checkpoint file name, step, epoch, finite metrics and the rule used."""
    metrics = {name: value for name in METRIC_MODES if (value := _number(best_row.get(name))) is not None}
    for name, cell in best_row.items():  # metrics added by other scorers, beyond the known ones
        if name not in metrics and name not in _NOT_METRICS and (value := _number(cell)) is not None:
            metrics[name] = value
    epoch = _number(best_row.get("epoch"))
    return {
        "checkpoint": str(best_row.get("checkpoint") or ""),
        "step": _step(best_row),
        "epoch": None if epoch is None else int(epoch),
        "metrics": metrics,
        "rule": rule,
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_best(
    output_dir: Path, best_name: str, best_row: dict[str, Any], rule: str, checkpoint_path: Path
) -> None:
    """Publish `checkpoint_path` as `best_name` (`<output_name>-best.safetensors`) and describe it in
    `best.json`.

    `rule` says how the best was chosen (e.g. "lowest eval_score among ok checkpoints"). Both new files are
    staged first, then renamed into place, so a failure while staging leaves the old pair untouched.
    A hard link shares the checkpoint's bytes: fine for kohya, which writes every checkpoint to a new name.
    """
    output_dir = Path(output_dir)
    target = output_dir / best_name
    json_path = output_dir / BEST_JSON
    payload = (json.dumps(best_record(best_row, rule), indent=2) + "\n").encode()
    same = target.exists() and os.path.samefile(target, checkpoint_path)
    tmp_model = _temp_name(target)
    tmp_json = _temp_name(json_path)
    try:
        if not same:  # renaming a hard link over itself would leave the temporary name behind
            _stage_checkpoint(Path(checkpoint_path), tmp_model)
        with open(tmp_json, "xb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if not same:
            os.replace(tmp_model, target)
        os.replace(tmp_json, json_path)
    finally:
        tmp_model.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
