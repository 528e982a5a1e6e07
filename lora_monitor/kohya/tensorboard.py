"""Read the scalars kohya logs to TensorBoard with `--logging_dir`: its learning rate (never printed) and its
full-precision loss (printed with 3 significant digits).

Layout: `logging_dir/<log_prefix><YYYYmmddHHMMSS>/network_train/events.out.tfevents.*`, one run folder per
launch. Tags (train_network.py `generate_step_logs`): `loss/current`, `loss/average`, `loss/epoch_average`,
`lr/textencoder`, `lr/unet` or `lr/group<i>` (kohya also always writes `lr/group<i>` for i >= 1), and with
D-Adaptation/Prodigy `lr/d*lr/...`.

Held-out validation (`--validation_split`, or a validation subset in `dataset_config`): kohya validates every
`--validate_every_n_steps` steps and logs `loss/validation/step_average` (and `.../step_divergence`, that
minus `loss/average`) at the global step; and, unless `--validate_every_n_epochs` says otherwise, after every
epoch `loss/validation/epoch_average` (and `.../epoch_divergence`) whose TensorBoard step is the 1-based
EPOCH number, written after the epoch's last training step. That epoch value is placed at the last training
step logged before it (file order). Both averages are over 4 fixed timesteps (200, 400, 600, 800 of 1000)
per validation image, with the RNG reseeded (`--validation_seed`, else `--seed`) for every pass.

`LogFollower` follows the run being trained (each poll reads only what was appended); `run_for_session`
finds, for LoRA files already on disk, the run that wrote them (never another run's logs).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LR_TAGS = ("lr/unet", "lr/group0", "lr/group1")
LOSS_TAG = "loss/average"  # the avr_loss kohya draws on its bar, at full precision
TRAIN_TAGS = ("loss/current", LOSS_TAG)  # logged at global steps: they tell where an epoch ended
VAL_STEP_TAG = "loss/validation/step_average"  # at the global step
VAL_EPOCH_TAG = "loss/validation/epoch_average"  # at the 1-based epoch number
EVENT_GLOB = "events.out.tfevents.*"
OWN_RUN_PREFIX = "lora-monitor"  # lora-monitor's own run (tracking/tensorboard_writer), never the trainer's
RUN_STAMP_RE = re.compile(r"(\d{14})$")  # kohya's run folder ends in time.strftime("%Y%m%d%H%M%S")
# kohya names the run folder when it prepares accelerate, then loads models and data before it records
# ss_training_started_at: the folder's stamp precedes that by the model-loading time.
RUN_BEFORE_START_S = 3600.0

Scalars = dict[str, dict[int, float]]


@dataclass
class StepFacts:
    """What kohya's logs say per step: loss, learning rate and held-out validation loss."""

    loss: dict[int, float] = field(default_factory=dict)
    lr: dict[int, float] = field(default_factory=dict)
    last_step: int | None = None  # the newest step kohya has logged
    # global step -> validation loss computed there: the step validations when the run has any, else the
    # epoch validations at their epoch's last step (the two are different averages, never mixed in one curve)
    val_loss: dict[int, float] = field(default_factory=dict)

    def val_loss_at(self, step: int) -> float | None:
        """The validation loss in force at `step`: the last one at or before it; None before any/without."""
        earlier = [s for s in self.val_loss if s <= step]
        return self.val_loss[max(earlier)] if earlier else None

    def lr_at(self, step: int) -> float | None:
        """The learning rate at `step`: the value logged at it, else the latest one before it."""
        if step in self.lr:
            return self.lr[step]
        earlier = [s for s in self.lr if s <= step]
        return self.lr[max(earlier)] if earlier else None


class _ScalarLog:
    """tag -> {step: value}, read in file order (a step logged twice: the later write wins), and each epoch
    validation placed at the last training step logged before it."""

    def __init__(self) -> None:
        self.scalars: Scalars = {}
        self.epoch_val_at_step: dict[int, float] = {}
        self._last_train_step: int | None = None

    def add(self, tag: str, step: int, value: float) -> None:
        self.scalars.setdefault(tag, {})[step] = value
        if tag in TRAIN_TAGS:
            self._last_train_step = max(step, self._last_train_step or 0)
        elif tag == VAL_EPOCH_TAG and self._last_train_step is not None:
            self.epoch_val_at_step[self._last_train_step] = value

    def facts(self) -> StepFacts:
        return facts_of(self.scalars, self.epoch_val_at_step)


def facts_of(scalars: Scalars, epoch_val_at_step: dict[int, float] | None = None) -> StepFacts:
    """Loss, learning rate (`lr/unet`, else `lr/group0`, else `lr/group1`) and validation loss from a
    tag -> {step: value}; `epoch_val_at_step` is the epoch validations by global step (see `_ScalarLog`)."""
    facts = StepFacts(loss=dict(scalars.get(LOSS_TAG, {})))
    facts.val_loss = dict(scalars.get(VAL_STEP_TAG) or epoch_val_at_step or {})
    for tag in LR_TAGS:
        if scalars.get(tag):
            facts.lr = dict(scalars[tag])
            break
    steps = [s for values in scalars.values() for s in values]
    facts.last_step = max(steps) if steps else None
    return facts


def _events(path: Path, loader: object | None = None) -> tuple[object, Iterator[tuple[str, int, float]]]:
    """(loader, new (tag, step, value) triples) of one event file; pass the loader back to read on."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    loader = loader or EventFileLoader(str(path))

    def triples() -> Iterator[tuple[str, int, float]]:
        for event in loader.Load():  # type: ignore[attr-defined]
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    yield value.tag, int(event.step), float(value.simple_value)
                elif kind == "tensor" and value.tensor.dtype in (1, 2):  # DT_FLOAT, DT_DOUBLE scalars
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.size == 1:
                        yield value.tag, int(event.step), float(array.reshape(()))

    return loader, triples()


def _event_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob(EVENT_GLOB)
        if p.is_file() and not p.relative_to(folder).parts[0].startswith(OWN_RUN_PREFIX)
    )


def _run_of(logging_dir: Path, path: Path) -> Path:
    """The run folder of an event file: the folder directly under `logging_dir`, or `logging_dir` itself."""
    relative = path.relative_to(logging_dir)
    return logging_dir / relative.parts[0] if len(relative.parts) > 1 else logging_dir


def read_run(run: Path) -> StepFacts:
    """Everything one run folder logged (a step logged twice: the later write wins)."""
    scalars = _ScalarLog()
    for path in _event_files(run):
        _, triples = _events(path)
        for tag, step, value in triples:
            scalars.add(tag, step, value)
    return scalars.facts()


class LogFollower:
    """Follows the TensorBoard run kohya writes under `logging_dir` during this launch.

    `since` (a `time.time()` value taken before kohya started) keeps an earlier run's folder out: the run
    followed is the first one whose event file appears after it. Each `poll()` reads only new events.
    """

    def __init__(self, logging_dir: Path, since: float) -> None:
        self.logging_dir = Path(logging_dir)
        self.since = since
        self.run: Path | None = None
        self.facts = StepFacts()
        self._scalars = _ScalarLog()
        self._loaders: dict[Path, object] = {}

    def poll(self) -> bool:
        """Read what kohya appended since the last poll; True when something new arrived."""
        files = [p for p in _event_files(self.logging_dir) if p.stat().st_mtime >= self.since]
        if self.run is None and files:
            self.run = _run_of(self.logging_dir, min(files, key=lambda p: p.stat().st_mtime))
        new = False
        for path in files:
            if _run_of(self.logging_dir, path) != self.run:
                continue
            try:
                self._loaders[path], triples = _events(path, self._loaders.get(path))
                for tag, step, value in triples:
                    self._scalars.add(tag, step, value)
                    new = True
            except OSError as exc:  # a file rotated away mid-read: the next poll reads on
                log.debug("TensorBoard file %s: %s", path, exc)
        if new:
            self.facts = self._scalars.facts()
        return new


def run_stamp(run: Path) -> float | None:
    """The local time in kohya's run folder name (`<prefix>20261130133019`), as a `time.time()` value."""
    match = RUN_STAMP_RE.search(run.name)
    if not match:
        return None
    try:
        return time.mktime(time.strptime(match.group(1), "%Y%m%d%H%M%S"))
    except ValueError:
        return None


def run_for_session(logging_dir: Path, started_at: float | None) -> Path | None:
    """The run folder under `logging_dir` that the training session started at `started_at` wrote.

    kohya stamps every LoRA file with `ss_training_started_at`; its run folder is named a little earlier
    (before model loading) and is written to after. The latest folder that fits both is the run;
    None when no folder fits (the logs belong to another run) or the files carry no start time.
    """
    if started_at is None:
        return None
    best: tuple[float, Path] | None = None
    for run in sorted({_run_of(logging_dir, p) for p in _event_files(logging_dir)}):
        stamp = run_stamp(run)
        if stamp is None or not (started_at - RUN_BEFORE_START_S <= stamp <= started_at + 1.0):
            continue
        if max(p.stat().st_mtime for p in _event_files(run)) < started_at - 1.0:
            continue  # last written before this session started: an earlier run
        if best is None or stamp > best[0]:
            best = (stamp, run)
    return best[1] if best else None
