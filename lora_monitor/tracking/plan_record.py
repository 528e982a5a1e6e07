"""eval/plan.json: what every checkpoint of a run is judged on, recorded once by the evaluator when it starts.

The report reads it back from the output folder alone (`lora-monitor report DIR` has no config): the reference
images the metrics compared with (the run's training images, as found and decoded) and, per generated image,
its prompt, seed and kind (an evaluation prompt, or a held-out one for clip_t_holdout). A checkpoint's
manifest.json only lists prompts and seeds, which cannot tell a held-out prompt from an evaluation prompt.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_monitor.evaluation.image_plan import ImagePlan

PLAN_RECORD = "plan.json"  # under <output_dir>/eval/, beside the checkpoints' folders


@dataclass(frozen=True)
class PlanRecord:
    references: tuple[Path, ...]
    kinds: dict[tuple[str, int | None], str]  # (prompt, seed) -> "main" or "holdout"
    order: tuple[tuple[str, int | None], ...]  # the images' (prompt, seed), in the plan's order


def write_plan_record(output_dir: Path, references: list[Path], plan: ImagePlan) -> Path:
    """Record the run's references and image plan (atomically; every evaluator of a run writes the same)."""
    record = {
        "references": [str(Path(p).resolve()) for p in references],
        "images": [{"prompt": p.text, "seed": p.seed, "kind": k} for p, k in zip(plan.prompts, plan.kinds,
                                                                                 strict=True)],
        "written": time.time(),
    }
    folder = Path(output_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PLAN_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, folder / PLAN_RECORD)
    return folder / PLAN_RECORD


def _seed(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_plan_record(output_dir: Path) -> PlanRecord | None:
    """The recorded plan; None when absent (a run from before it was recorded) or unreadable."""
    try:
        data = json.loads((Path(output_dir) / "eval" / PLAN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    references = tuple(Path(p) for p in data.get("references") or [] if isinstance(p, str) and p)
    order: list[tuple[str, int | None]] = []
    kinds: dict[tuple[str, int | None], str] = {}
    for image in data.get("images") or []:
        if isinstance(image, dict) and isinstance(image.get("prompt"), str):
            key = (image["prompt"], _seed(image.get("seed")))
            order.append(key)
            kinds[key] = str(image.get("kind") or "main")
    return PlanRecord(references, kinds, tuple(order))
