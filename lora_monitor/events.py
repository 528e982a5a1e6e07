"""Events that flow along the data path: trainer output -> watcher -> evaluator -> tracker -> view.

Components talk through these plain frozen dataclasses, never through shared globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TotalSteps:
    """kohya's run header: `total optimization steps / ...: N`."""

    total: int


@dataclass(frozen=True)
class TrainProgress:
    """One redraw of kohya's `steps:` tqdm bar.

    `loss` is the `avr_loss` shown with this redraw (None before the first step finished);
    `rate` is steps per second as tqdm printed it (None when not shown); `epoch` the 1-based epoch in
    force (None before kohya printed one).
    """

    step: int
    total: int
    loss: float | None = None
    rate: float | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class EpochStarted:
    """`epoch n/N` on kohya's stdout (1-based)."""

    epoch: int
    total: int


@dataclass(frozen=True)
class CheckpointSaving:
    """`saving checkpoint: PATH`, printed before the file is written."""

    path: Path


@dataclass(frozen=True)
class CheckpointRemoved:
    """`removing old checkpoint: PATH` (kohya's --save_last_n_* options)."""

    path: Path


@dataclass(frozen=True)
class TrainerLog:
    """A complete log line of the trainer; level is 'info', 'warning' or 'error'."""

    text: str
    level: str = "info"
    stream: str = "stderr"


@dataclass(frozen=True)
class TrainerExited:
    returncode: int
    last_lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointReady:
    """A LoRA file that is completely written and may be evaluated."""

    path: Path
    step: int | None
    epoch: int | None = None
    is_final: bool = False


@dataclass(frozen=True)
class EvalResult:
    """The scores of one checkpoint, or the reason it could not be scored."""

    checkpoint: Path
    step: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None
    seconds: float | None = None
    skipped: bool = False  # e.g. kohya deleted the file (--save_last_n_steps) before its turn
    baseline: bool = False  # the base model without a LoRA (checkpoint "baseline", step 0)
    by_strength: dict[float, dict[str, float]] = field(default_factory=dict)  # [eval] strengths other than 1.0


@dataclass(frozen=True)
class FileComplete:
    """The watcher saw a LoRA file completely written (its header accounts for its size)."""

    path: Path


@dataclass(frozen=True)
class FileDeleted:
    """A LoRA file vanished before it was complete (kohya's --save_last_n_* removing old saves)."""

    path: Path


@dataclass(frozen=True)
class EvalWarning:
    """Something the user should know about evaluation (a prompt cut at 77 tokens, ...); the run goes on."""

    text: str


@dataclass(frozen=True)
class EvalDisabled:
    """The evaluator could not start (a model missing, ...); training goes on without evaluation."""

    reason: str
