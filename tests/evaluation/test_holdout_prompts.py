"""Held-out prompts (clip_t_holdout): the trained subject in contexts the captions never had."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lora_monitor.config import parse_config
from lora_monitor.demo.dataset import CAPTIONS, TRIGGER
from lora_monitor.errors import UserError
from lora_monitor.evaluation.prompts import (
    DEFAULT_HOLDOUT_CONTEXTS,
    Prompt,
    holdout_prompts_from_captions,
    load_contexts,
    load_holdout_prompts,
    trigger_words,
)


@pytest.mark.parametrize(
    ("captions", "expected"),
    [
        (list(CAPTIONS), TRIGGER),  # the demo: "…, sks style" on every caption
        (["sks, red dress, white background", "sks, red dress, studio", "SKS , red dress"], "sks, red dress"),
        (["sks dress on a hanger", "sks dress folded", "sks dress"], "sks dress"),  # no tags: shared first words
        (["ohwx jacket, front", "ohwx jacket, back"], "ohwx jacket"),
        (["a red dress", "a blue coat"], "a"),
        (["red dress", "blue coat"], ""),
        (["", "  "], ""),
        (["sks style", "", "sks style, red"], "sks style"),  # images without a caption file are ignored
    ],
)
def test_trigger_words(captions: list[str], expected: str) -> None:
    assert trigger_words(captions) == expected


def test_shipped_contexts() -> None:
    contexts = load_contexts()
    assert 6 <= len(contexts) <= 12 and len(set(contexts)) == len(contexts)
    assert {"worn on a city street", "back view", "in a watercolour painting"} <= set(contexts)
    assert not any(c.startswith("#") for c in contexts)


def test_demo_holdout_prompts() -> None:
    prompts = load_holdout_prompts(None, list(CAPTIONS))
    assert prompts[:2] == [Prompt(f"{TRIGGER}, worn on a city street"), Prompt(f"{TRIGGER}, back view")]
    assert len(prompts) == len(load_contexts(DEFAULT_HOLDOUT_CONTEXTS))


def _random_captions(rng: random.Random) -> list[str]:
    """Captions of a LoRA data set: a trigger, a garment, some tags — and some that ARE a trigger + context."""
    contexts = load_contexts()
    trigger = rng.choice(["sks style", "ohwx", "zxc dress", "sks"])
    garment = rng.choice(["red dress", "denim jacket", "wool coat", ""])
    captions = []
    for _ in range(rng.randint(1, 6)):
        tags = [t for t in (garment, rng.choice(contexts + ["white background", "studio"])) if t]
        rng.shuffle(tags)
        caption = ", ".join([trigger, *tags] if rng.random() < 0.5 else [*tags, trigger])
        captions.append(caption.upper() if rng.random() < 0.2 else caption)
    if rng.random() < 0.5:  # a caption that is exactly what the builder would make
        captions.append(f"{trigger}, {rng.choice(contexts)}")
    return captions


@pytest.mark.parametrize("seed", range(40))
def test_holdout_prompts_never_equal_a_training_caption(seed: int) -> None:
    rng = random.Random(seed)
    captions = _random_captions(rng)
    prompts = holdout_prompts_from_captions(captions, load_contexts())
    normal = {" ".join(c.casefold().replace(" ,", ",").split()) for c in captions}
    assert prompts, captions  # every caption shares the trigger
    for prompt in prompts:
        assert " ".join(prompt.text.casefold().split()) not in normal
        assert trigger_words(captions) in prompt.text
    assert len({p.text for p in prompts}) == len(prompts)


def test_captions_without_shared_words_give_no_holdout_prompts() -> None:
    assert holdout_prompts_from_captions(["red dress", "blue coat"], ["back view"]) == []


def test_a_holdout_file_is_read_as_a_prompt_file(tmp_path: Path) -> None:
    f = tmp_path / "holdout.txt"
    f.write_text("# held out\nsks style, on a mountain --d 5\nsks style, as a cartoon\n", encoding="utf-8")
    assert load_holdout_prompts(f, list(CAPTIONS)) == [Prompt("sks style, on a mountain", seed=5),
                                                      Prompt("sks style, as a cartoon")]


def test_a_holdout_file_repeating_a_caption_is_a_user_error(tmp_path: Path) -> None:
    f = tmp_path / "holdout.txt"
    f.write_text(f"sks style, on a mountain\n{CAPTIONS[1].upper()}  --d 3\n", encoding="utf-8")
    with pytest.raises(UserError, match="is a training caption"):
        load_holdout_prompts(f, list(CAPTIONS))


def test_unreadable_or_empty_context_list_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read the held-out context list"):
        load_contexts(tmp_path / "missing.list")
    (tmp_path / "empty.list").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="no contexts"):
        load_contexts(tmp_path / "empty.list")


def test_config_key_is_a_path_relative_to_the_config(tmp_path: Path) -> None:
    config = parse_config('[eval]\nholdout_prompts = "prompts/holdout.txt"\n', tmp_path / "c.toml")
    assert config.eval.holdout_prompts == (tmp_path / "prompts" / "holdout.txt").resolve()
    assert parse_config("", tmp_path / "c.toml").eval.holdout_prompts is None
