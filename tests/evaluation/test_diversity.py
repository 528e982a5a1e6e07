"""Diversity (1 − mean pairwise cosine within a prompt's seeds): the math as tables, then on DINO embeddings."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_monitor.demo.dataset import draw_dress, random_pose
from lora_monitor.demo.scoring_models import build_tiny_dino, build_tiny_fashion_clip
from lora_monitor.evaluation.diversity import diversity, group_diversity
from lora_monitor.evaluation.metrics import Scorer, pairwise_cosine_loss

E1, E2, E3 = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]


@pytest.mark.parametrize(
    "embeddings, expected",
    [
        ([E1, E1], 0.0),  # the same picture twice: no variety
        ([E1, [3.0, 0.0]], 0.0),  # length does not matter, direction does
        ([E1, E2], 1.0),  # orthogonal
        ([E1, E3], 2.0),  # opposite: the upper bound
        ([E1, E1, E2], 1 - 1 / 3),  # pairs: (1, 0, 0) -> mean 1/3
    ],
)
def test_group_diversity_table(embeddings: list, expected: float) -> None:
    assert group_diversity(np.array(embeddings)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_group_diversity_matches_brute_force_and_range(seed: int) -> None:
    e = np.random.default_rng(seed).normal(size=(2 + seed, 7))
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    pairs = [float(u[i] @ u[j]) for i, j in itertools.combinations(range(len(u)), 2)]
    value = group_diversity(e)
    assert value == pytest.approx(1 - np.mean(pairs))
    assert 0.0 <= value <= 2.0


@pytest.mark.parametrize(
    "embeddings, prompts, expected",
    [
        ([E1, E2], ["a", "a"], 1.0),
        ([E1, E2, E1, E1], ["a", "a", "b", "b"], 0.5),  # mean over prompts: (1 + 0) / 2
        ([E1, E2, E1], ["a", "a", "b"], 1.0),  # "b" has one image: skipped
        ([E1, E2, E3], ["a", "b", "c"], None),  # no prompt with two seeds: no value, not 0
        ([E1, E2, E1, E3, E1], ["a", "b", "a", "b", "b"], (0.0 + (1 + 1 + 2) / 3) / 2),  # interleaved rows
    ],
)
def test_diversity_groups_by_prompt(embeddings: list, prompts: list[str], expected: float | None) -> None:
    value = diversity(np.array(embeddings), prompts)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected)


@pytest.mark.parametrize(
    "embeddings, prompts, message",
    [
        (np.ones((2, 3)), ["a"], "one prompt per image"),
        (np.array([E1, [0.0, 0.0]]), ["a", "a"], "non-zero"),
        (np.array([E1, [np.nan, 0.0]]), ["a", "a"], "finite"),
    ],
)
def test_diversity_rejects_bad_input(embeddings: np.ndarray, prompts: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        diversity(embeddings, prompts)


def test_group_diversity_needs_two_images() -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        group_diversity(np.ones((1, 4)))


# ----------------------------------------------------------------------- on the visual model's embeddings
@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scorer]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        root = tmp_path_factory.mktemp("models")
        yield Scorer(str(build_tiny_fashion_clip(root / "fclip")), str(build_tiny_dino(root / "dino")))


def test_identical_images_have_no_diversity_and_different_ones_some(scorer: Scorer) -> None:
    rng = random.Random(3)
    dress = draw_dress(random_pose(rng), 64)
    other = draw_dress(random_pose(rng), 64)
    blue = Image.new("RGB", (64, 64), (20, 40, 200))
    images = [dress, dress.copy(), dress, other, dress, blue]
    prompts = ["same", "same", "close", "close", "far", "far"]
    emb = scorer.embed_visual(images)
    assert emb.shape[0] == len(images)
    assert diversity(emb[:2], prompts[:2]) == pytest.approx(0.0, abs=1e-5)
    close, far = diversity(emb[2:4], prompts[2:4]), diversity(emb[4:], prompts[4:])
    assert close is not None and far is not None
    assert 0.0 < close < far <= 2.0


def test_embed_visual_needs_an_image(scorer: Scorer) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        scorer.embed_visual([])


def test_embed_visual_is_the_visual_loss_embedding(scorer: Scorer, tmp_path: Path) -> None:
    """Same model and preparation as visual_loss: the loss recomputed from embed_visual matches score()."""
    rng = random.Random(5)
    ref, generated = draw_dress(random_pose(rng), 64), draw_dress(random_pose(rng), 48)
    ref.save(tmp_path / "ref.png")
    scorer.set_references([tmp_path / "ref.png"])
    expected = pairwise_cosine_loss(scorer.embed_visual([generated]), scorer.embed_visual([ref]))
    assert expected > 0
    assert scorer.score([generated])["visual_loss"] == pytest.approx(expected, abs=1e-5)
