"""Which images a checkpoint is judged on: each evaluation prompt at `[eval] seeds_per_prompt` seeds (the
first seed is the one a single-seed run uses, so its images do not change), then each held-out prompt once.

The plan is fixed for a run, so every checkpoint, the baseline and every strength get the same prompts and
the same noise: differences between rows come from the weights alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lora_monitor.evaluation.prompts import Prompt

MAIN = "main"  # the evaluation prompts: visual, FashionCLIP, colour, clip_t, diversity
HOLDOUT = "holdout"  # prompts the captions never had: clip_t_holdout
SEED_STRIDE = 1000  # seed j of a prompt is its first seed + j * SEED_STRIDE (no overlap with the next prompt's)
HOLDOUT_SEED_OFFSET = 500  # held-out prompt k uses the run seed + HOLDOUT_SEED_OFFSET + k


@dataclass(frozen=True)
class ImagePlan:
    prompts: tuple[Prompt, ...]  # one per image, each with its seed set
    kinds: tuple[str, ...]  # MAIN or HOLDOUT, per image

    def indices(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    def texts(self, kind: str) -> list[str]:
        return [self.prompts[i].text for i in self.indices(kind)]


def build_plan(prompts: list[Prompt], holdout: list[Prompt], seeds_per_prompt: int, run_seed: int) -> ImagePlan:
    """Main prompt i keeps kohya's `--d` seed, else run_seed + i (as always); its extra seeds follow it."""
    if seeds_per_prompt < 1:
        raise ValueError("seeds_per_prompt must be at least 1")
    out: list[Prompt] = []
    kinds: list[str] = []
    for i, prompt in enumerate(prompts):
        first = prompt.seed if prompt.seed is not None else run_seed + i
        for j in range(seeds_per_prompt):
            out.append(dataclasses.replace(prompt, seed=first + j * SEED_STRIDE))
            kinds.append(MAIN)
    for k, prompt in enumerate(holdout):
        seed = prompt.seed if prompt.seed is not None else run_seed + HOLDOUT_SEED_OFFSET + k
        out.append(dataclasses.replace(prompt, seed=seed))
        kinds.append(HOLDOUT)
    return ImagePlan(tuple(out), tuple(kinds))
