"""The images a checkpoint is judged on: prompts x seeds, then held-out prompts."""

from __future__ import annotations

import pytest

from lora_monitor.evaluation.image_plan import HOLDOUT, MAIN, build_plan
from lora_monitor.evaluation.prompts import Prompt

A, B = Prompt("a, sks"), Prompt("b, sks", seed=7)
H = Prompt("a, sks, back view")


@pytest.mark.parametrize(
    ("prompts", "holdout", "k", "texts", "seeds", "kinds"),
    [
        ([A, B], [], 1, ["a, sks", "b, sks"], [42, 7], [MAIN, MAIN]),  # one seed: the images of before
        ([A, B], [], 2, ["a, sks", "a, sks", "b, sks", "b, sks"], [42, 1042, 7, 1007], [MAIN] * 4),
        ([A], [H], 2, ["a, sks", "a, sks", "a, sks, back view"], [42, 1042, 542], [MAIN, MAIN, HOLDOUT]),
        ([], [H, H], 3, ["a, sks, back view"] * 2, [542, 543], [HOLDOUT, HOLDOUT]),
    ],
)
def test_build_plan(prompts: list[Prompt], holdout: list[Prompt], k: int, texts: list[str], seeds: list[int],
                    kinds: list[str]) -> None:
    plan = build_plan(prompts, holdout, k, run_seed=42)
    assert [p.text for p in plan.prompts] == texts
    assert [p.seed for p in plan.prompts] == seeds
    assert list(plan.kinds) == kinds
    assert len(set(zip(texts, seeds, strict=True))) == len(texts)  # no image twice


def test_plan_needs_a_seed() -> None:
    with pytest.raises(ValueError):
        build_plan([A], [], 0, run_seed=1)
