"""Diversity: how much the images of one prompt differ across seeds — it falls when outputs collapse.

diversity = mean over prompts of (1 − mean over pairs i < j of cos(eᵢ, eⱼ)), with e the DINO embeddings
(`Scorer.embed_visual`) of one prompt's images, one per seed. Range [0, 2]; 0 = every seed gives the same
picture (to the model's eye), higher = more varied. A prompt with a single image says nothing about variety and
is skipped; when no prompt has two images the value is None (an empty column, not a 0 that would read as
collapse). Every prompt weighs the same, whatever its number of seeds.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def group_diversity(embeddings: np.ndarray) -> float:
    """1 − mean pairwise cosine among the rows of `embeddings` (n ≥ 2, d); in [0, 2]."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or len(e) < 2:
        raise ValueError(f"diversity needs an (n >= 2, d) array of embeddings, got shape {e.shape}")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("diversity: embeddings must be finite and non-zero")
    u = e / norms
    cos = u @ u.T
    n = len(u)
    mean_pair = (cos.sum() - np.trace(cos)) / (n * (n - 1))
    return float(np.clip(1.0 - mean_pair, 0.0, 2.0))


def diversity(embeddings: np.ndarray, prompts: Sequence[Hashable]) -> float | None:
    """Mean `group_diversity` over the prompts with ≥ 2 images; row i of `embeddings` is an image of prompts[i].

    None when no prompt has two images (e.g. `[eval] seeds_per_prompt = 1`).
    """
    e = np.asarray(embeddings)
    if len(e) != len(prompts):
        raise ValueError(f"{len(e)} embeddings for {len(prompts)} prompts; give one prompt per image")
    rows: dict[Hashable, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rows.setdefault(prompt, []).append(i)
    values = [group_diversity(e[idx]) for idx in rows.values() if len(idx) >= 2]
    return float(np.mean(values)) if values else None
