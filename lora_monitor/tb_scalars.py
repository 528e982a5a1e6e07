"""Read the scalars kohya logs to TensorBoard with `--logging_dir`: the only place its learning rate appears.

Layout: `logging_dir/<log_prefix><YYYYmmddHHMMSS>/network_train/events.out.tfevents.*`, one run folder per
launch. Tags (train_network.py `generate_step_logs`): `loss/current`, `loss/average`, `loss/epoch_average`,
`lr/textencoder`, `lr/unet` or `lr/group<i>` (kohya also always writes `lr/group<i>` for i >= 1), and with
D-Adaptation/Prodigy `lr/d*lr/...`.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

LR_TAGS = ("lr/unet", "lr/group0", "lr/group1")
EVENT_GLOB = "events.out.tfevents.*"
_warned_missing = False


OWN_RUN_PREFIX = "lora-monitor"


def read_scalars(logging_dir: Path, since: float | None = None) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the newest run under `logging_dir` (all event files below it).

    The newest run is the folder directly under `logging_dir` whose event files were written last; when the
    event files lie directly in `logging_dir`, that folder is the run. `since` (a `time.time()` value) ignores
    event files last written before it, so an earlier run is not mistaken for the current one.
    Returns {} when there is nothing to read, or when the tensorboard package is missing (warned once).
    """
    # lora-monitor's own run (tb_writer) lives beside kohya's; it is never the trainer's run.
    files = [
        p
        for p in Path(logging_dir).rglob(EVENT_GLOB)
        if p.is_file() and not p.relative_to(Path(logging_dir)).parts[0].startswith(OWN_RUN_PREFIX)
    ]
    if since is not None:
        files = [p for p in files if p.stat().st_mtime >= since]
    if not files:
        return {}
    accumulator = _accumulator_class()
    if accumulator is None:
        return {}
    runs = {path: _run_of(Path(logging_dir), path) for path in files}
    written: dict[Path, float] = {}
    for path, run in runs.items():
        written[run] = max(written.get(run, float("-inf")), path.stat().st_mtime)
    newest = max(written, key=lambda run: (written[run], run.name))
    scalars: dict[str, dict[int, float]] = {}
    newest_wall: dict[tuple[str, int], float] = {}
    for path in sorted(p for p in files if runs[p] == newest):
        acc = accumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every value
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for event in acc.Scalars(tag):
                key = (tag, int(event.step))
                # a step logged twice (e.g. a resumed run in the same folder): the later write wins
                if event.wall_time >= newest_wall.get(key, float("-inf")):
                    newest_wall[key] = event.wall_time
                    scalars.setdefault(tag, {})[int(event.step)] = float(event.value)
    return scalars


def learning_rate_at(scalars: dict[str, dict[int, float]], step: int) -> float | None:
    """The U-Net learning rate at `step` (`lr/unet`, else `lr/group0`, else `lr/group1`).

    Uses the value logged at `step`, else the latest one logged before it; None when there is none.
    """
    for tag in LR_TAGS:
        values = scalars.get(tag)
        if not values:
            continue
        if step in values:
            return values[step]
        earlier = [s for s in values if s <= step]
        return values[max(earlier)] if earlier else None
    return None


def _run_of(logging_dir: Path, path: Path) -> Path:
    """The run folder of an event file: the folder directly under `logging_dir`, or `logging_dir` itself."""
    relative = path.relative_to(logging_dir)
    return logging_dir / relative.parts[0] if len(relative.parts) > 1 else logging_dir


def _accumulator_class() -> type | None:
    global _warned_missing
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            log.warning("the tensorboard package is not installed: the learning rate column stays empty "
                        "(pip install tensorboard)")
        return None
    return EventAccumulator
