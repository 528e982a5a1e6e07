"""The over-training signals of one checkpoint's images (besides the metrics against the references):

- clip_t_holdout: text alignment on the held-out prompts (does it still follow prompts it never saw?)
- diversity: 1 - mean cosine (DINO) among a prompt's seeds (do its images still vary?)
- copy_distance / copies: the nearest any image comes to a reference, and how many count as copies
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from lora_monitor.evaluation.diversity import diversity
from lora_monitor.evaluation.image_plan import HOLDOUT, MAIN, ImagePlan
from lora_monitor.evaluation.memorisation import CopyIndex, count_copies


def overtraining_signals(scorer: Any, copies: CopyIndex | None, copy_threshold: float, plan: ImagePlan,
                         images: Sequence[Image.Image], main_visual: np.ndarray | None = None) -> dict[str, float]:
    """The signals the plan allows: clip_t_holdout needs held-out prompts, diversity two seeds of a prompt.

    main_visual: the evaluation prompts' DINO embeddings when the caller already computed them for visual_loss.
    """
    if len(images) != len(plan.prompts):
        raise ValueError(f"{len(images)} images for a plan of {len(plan.prompts)}")
    out: dict[str, float] = {}
    held = plan.indices(HOLDOUT)
    if held:
        out["clip_t_holdout"] = scorer.text_alignment([images[i] for i in held], plan.texts(HOLDOUT))
    main = plan.indices(MAIN)
    if main and main_visual is None:
        main_visual = scorer.embed_visual([images[i] for i in main])
    value = diversity(main_visual, plan.texts(MAIN)) if main else None
    if value is not None:
        out["diversity"] = value
    if copies is not None:
        distances = copies.distances(images)
        out["copy_distance"] = min(distances)
        out["copies"] = float(count_copies(distances, copy_threshold))
    return out
