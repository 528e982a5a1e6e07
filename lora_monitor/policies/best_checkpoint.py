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
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_monitor.policies.early_stopping import METRIC_MODES
from lora_monitor.policies.overtraining import DEFAULT_BOUNDS, Bounds, flag_names, flag_rows, number, step_of

BEST_JSON = "best.json"
BEST_SUFFIX = "-best.safetensors"
# CSV columns that are not scores of the checkpoint.
_NOT_METRICS = {"step", "epoch", "timestamp", "checkpoint", "status", "note", "eval_seconds", "learning_rate"}


def best_file_name(output_name: str) -> str:
    """`<output_name>-best.safetensors`: a watcher of the output folder must not treat it as a checkpoint."""
    return f"{output_name}{BEST_SUFFIX}"


# [best] rule: how the best checkpoint is chosen.
NOT_OVERTRAINED = "not_overtrained"  # the best eval_score among checkpoints not flagged as over-trained
LOWEST_SCORE = "lowest_score"  # the best eval_score among all ok checkpoints, flagged or not
RULES = (NOT_OVERTRAINED, LOWEST_SCORE)
RANKED_BY = "eval_score"  # lower is better; both rules rank by it, whatever early stopping monitors


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
        value = number(row.get(monitor))
        if str(row.get("status", "")).strip() != "ok" or value is None:
            continue
        step = step_of(row)
        key = (sign * value, math.inf if step is None else float(step), index)
        if best is None or key < best:
            best, best_row = key, row
    return best_row


@dataclass(frozen=True)
class Choice:
    """The best checkpoint under a [best] rule, and the checkpoints the rule left out, with why.

    best: the chosen row, or None (no scored checkpoint yet, or every one is flagged as over-trained).
    rule: how it was chosen, in words (best.json's "rule").
    excluded: {"checkpoint", "step", "eval_score", "reasons"} of each flagged checkpoint the rule passed
        over, by step; empty under "lowest_score", which passes over none.
    flags: the best's own over-training flags (only "lowest_score" can choose a flagged checkpoint).
    """

    best: dict[str, Any] | None
    rule: str
    excluded: tuple[dict[str, Any], ...] = ()
    flags: tuple[str, ...] = ()

    @property
    def none_clean(self) -> bool:
        """Scored checkpoints exist but every one is flagged: no best, on purpose."""
        return self.best is None and bool(self.excluded)


def _excluded_entry(row: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    return {"checkpoint": str(row.get("checkpoint") or ""), "step": step_of(row),
            "eval_score": number(row.get(RANKED_BY)), "reasons": list(reasons)}


def choose_best(rows: list[dict[str, Any]], rule: str = NOT_OVERTRAINED, bounds: Bounds = DEFAULT_BOUNDS) -> Choice:
    """The best checkpoint of `rows` (the tracker's rows, baseline included) under `rule`.

    Candidates are ok rows with a finite eval_score; the baseline (the base model, no LoRA) never is one.
    Under "not_overtrained" a flagged candidate is passed over; when every candidate is flagged there is no
    best rather than a least-bad one, so a script reading `-best.safetensors` never gets an over-trained
    file called best. `excluded` then lists them all, with their scores, for a person to choose from.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    judged = [(row, reasons) for row, reasons in flag_rows(rows, bounds)
              if str(row.get("status", "")).strip() == "ok" and number(row.get(RANKED_BY)) is not None]
    if rule == LOWEST_SCORE:
        best = select_best([row for row, _ in judged], RANKED_BY, "min")
        own = next((reasons for row, reasons in judged if row is best), [])
        return Choice(best, f'lowest {RANKED_BY} among ok checkpoints, over-training flags ignored '
                            f'([best] rule = "{LOWEST_SCORE}")', (), tuple(own))
    clean = [row for row, reasons in judged if not reasons]
    entries = [_excluded_entry(row, reasons) for row, reasons in judged if reasons]
    excluded = tuple(sorted(entries, key=lambda e: (math.inf if e["step"] is None else e["step"], e["checkpoint"])))
    best = select_best(clean, RANKED_BY, "min")
    if best is None and excluded:
        return Choice(None, f"every evaluated checkpoint is flagged as over-trained, so none is the best "
                            f'([best] rule = "{NOT_OVERTRAINED}"; "{LOWEST_SCORE}" ranks them anyway)', excluded)
    return Choice(best, f"lowest {RANKED_BY} among checkpoints not flagged as over-trained "
                        f'([best] rule = "{NOT_OVERTRAINED}")', excluded)


def exclusions_text(choice: Choice) -> str:
    """One short line on what the rule passed over, for the live view: "" when nothing was."""
    if choice.flags:
        return f"flagged: {', '.join(flag_names(choice.flags))}"
    if not choice.excluded:
        return ""
    names = flag_names(reason for entry in choice.excluded for reason in entry["reasons"])
    return f"{len(choice.excluded)} excluded as over-trained ({', '.join(names)})"


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


def best_record(best_row: dict[str, Any], rule: str, excluded: tuple[dict[str, Any], ...] = (),
                flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """The content of best.json: checkpoint file name, step, epoch, finite metrics, the rule used, the
    checkpoints the rule excluded (with why) and the best's own over-training flags."""
    metrics = {name: value for name in METRIC_MODES if (value := number(best_row.get(name))) is not None}
    for name, cell in best_row.items():  # metrics added by other scorers, beyond the known ones
        if name not in metrics and name not in _NOT_METRICS and (value := number(cell)) is not None:
            metrics[name] = value
    epoch = number(best_row.get("epoch"))
    return {
        "checkpoint": str(best_row.get("checkpoint") or ""),
        "step": step_of(best_row),
        "epoch": None if epoch is None else int(epoch),
        "metrics": metrics,
        "rule": rule,
        "excluded": list(excluded),
        "flags": list(flags),
        "updated": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def no_best_record(rule: str, excluded: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """best.json when no checkpoint qualifies: the same keys, checkpoint and step null."""
    return {"checkpoint": None, "step": None, "epoch": None, "metrics": {}, "rule": rule,
            "excluded": list(excluded), "flags": [], "updated": datetime.now(UTC).isoformat(timespec="seconds")}


def write_best(
    output_dir: Path, best_name: str, best_row: dict[str, Any], rule: str, checkpoint_path: Path,
    excluded: tuple[dict[str, Any], ...] = (), flags: tuple[str, ...] = (),
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
    payload = (json.dumps(best_record(best_row, rule, excluded, flags), indent=2) + "\n").encode()
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


def write_no_best(output_dir: Path, best_name: str, rule: str, excluded: tuple[dict[str, Any], ...]) -> None:
    """Say in best.json that no checkpoint qualifies, then take down `best_name` if an earlier best left it.

    That happens when a row written late (the baseline, a backfilled step) flags the checkpoint that was
    best. The file is a link to (or copy of) a checkpoint that keeps its own name, so nothing is lost; it
    goes after best.json is replaced, so a reader never finds best.json naming a checkpoint that is gone.
    """
    output_dir = Path(output_dir)
    payload = (json.dumps(no_best_record(rule, excluded), indent=2) + "\n").encode()
    atomic_write_bytes(output_dir / BEST_JSON, payload)
    (output_dir / best_name).unlink(missing_ok=True)


def best_strength(by_strength: dict[float, dict[str, Any]], baseline: Mapping[str, Any] | None,
                  rule: str = NOT_OVERTRAINED, bounds: Bounds = DEFAULT_BOUNDS) -> float | None:
    """The LoRA scale the best-checkpoint rule prefers for one checkpoint: the lowest eval_score among its
    `[eval] strengths` (under "not_overtrained", among the scales no flag excludes). None when none qualifies.

    val_loss is the checkpoint's own at every scale, so only the image signals tell scales apart.
    """
    from lora_monitor.policies.overtraining import flags

    scored = [(scale, metrics) for scale, metrics in by_strength.items() if number(metrics.get(RANKED_BY)) is not None]
    if rule == NOT_OVERTRAINED:
        scored = [(scale, m) for scale, m in scored if not flags(m, baseline, [], bounds)]
    if not scored:
        return None
    return min(scored, key=lambda item: (number(item[1].get(RANKED_BY)), abs(item[0] - 1.0)))[0]
