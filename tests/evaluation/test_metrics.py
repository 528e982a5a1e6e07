"""Metrics: the pairwise formulas with injected embeddings, model availability checks, and the Scorer end to
end with the tiny stand-in models (built locally, offline)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lora_monitor.demo.scoring_models import build_tiny_dino, build_tiny_fashion_clip
from lora_monitor.errors import UserError
from lora_monitor.evaluation.metrics import (
    COLOR_SCALE_DE,
    DEFAULT_WEIGHTS,
    HIGHER_IS_BETTER,
    METRIC_COLUMNS,
    METRIC_RANGES,
    Scorer,
    check_model_available,
    clip_t_score,
    eval_score,
    pad_to_square,
    pairwise_cosine_loss,
    resolve_weights,
)

torch.set_num_threads(1)
RED = (200, 30, 40)
NAVY = (30, 40, 110)


def garment(color: tuple[int, int, int], size: int = 64, height: int | None = None) -> Image.Image:
    """A dress in `color` on white, with darker folds."""
    h = height or size
    img = Image.new("RGB", (size, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    sx, sy = size / 64, h / 64
    d.polygon([(24 * sx, 6 * sy), (40 * sx, 6 * sy), (42 * sx, 26 * sy), (22 * sx, 26 * sy)], fill=color)
    d.polygon([(22 * sx, 26 * sy), (42 * sx, 26 * sy), (54 * sx, 60 * sy), (10 * sx, 60 * sy)], fill=color)
    shade = tuple(int(c * 0.7) for c in color)
    for x in (20, 30, 40):
        d.line([(32 * sx, 28 * sy), (x * sx, 58 * sy)], fill=shade, width=2)
    return img


# ------------------------------------------------------------------------------- pure formulas, injected
def _brute_force_loss(g: np.ndarray, r: np.ndarray) -> float:
    sims = [
        float(np.dot(gi, rj) / (np.linalg.norm(gi) * np.linalg.norm(rj))) for gi in g for rj in r
    ]
    return 1.0 - sum(sims) / len(sims)


@pytest.mark.parametrize(
    ("gen", "ref", "expected"),
    [
        ([[1, 0]], [[1, 0]], 0.0),
        ([[1, 0]], [[5, 0]], 0.0),  # length does not matter
        ([[1, 0], [1, 0], [1, 0]], [[2, 0]], 0.0),  # copies of one image
        ([[1, 0]], [[0, 1]], 1.0),
        ([[1, 0]], [[-1, 0]], 2.0),
        ([[1, 0]], [[1, 0], [-1, 0]], 1.0),  # mean over pairs, not best match
        ([[1, 0], [0, 1]], [[1, 0]], 0.5),
        ([[1, 1]], [[1, 0]], 1.0 - math.sqrt(0.5)),
    ],
)
def test_pairwise_cosine_loss_table(gen: list, ref: list, expected: float) -> None:
    g, r = np.array(gen, dtype=float), np.array(ref, dtype=float)
    assert pairwise_cosine_loss(g, r) == pytest.approx(expected, abs=1e-9)
    assert pairwise_cosine_loss(r, g) == pytest.approx(expected, abs=1e-9)  # symmetric


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_cosine_loss_matches_brute_force_and_bounds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(rng.integers(1, 6), 16))
    r = rng.normal(size=(rng.integers(1, 9), 16))
    loss = pairwise_cosine_loss(g, r)
    assert loss == pytest.approx(_brute_force_loss(g, r), abs=1e-9)
    assert 0.0 <= loss <= 2.0
    assert pairwise_cosine_loss(g, g[:1]) <= 2.0
    assert pairwise_cosine_loss(g[:1], g[:1]) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("gen", "ref"),
    [
        (np.zeros((1, 3)), np.ones((1, 3))),  # zero vector has no direction
        (np.ones((1, 3)), np.ones((1, 4))),  # sizes differ
        (np.ones((0, 3)), np.ones((1, 3))),  # no images
        (np.array([[np.nan, 1.0]]), np.ones((1, 2))),
    ],
)
def test_pairwise_cosine_loss_rejects_bad_input(gen: np.ndarray, ref: np.ndarray) -> None:
    with pytest.raises(ValueError):
        pairwise_cosine_loss(gen, ref)


@pytest.mark.parametrize(
    ("img", "txt", "expected"),
    [
        ([[1, 0]], [[3, 0]], 1.0),
        ([[1, 0]], [[-1, 0]], -1.0),
        ([[1, 0], [0, 1]], [[1, 0], [1, 0]], 0.5),  # each image against its own prompt only
        ([[1, 0], [0, 1]], [[0, 1], [1, 0]], 0.0),
    ],
)
def test_clip_t_score_table(img: list, txt: list, expected: float) -> None:
    assert clip_t_score(np.array(img, float), np.array(txt, float)) == pytest.approx(expected, abs=1e-9)


def test_clip_t_score_needs_one_prompt_per_image() -> None:
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_t_score(np.ones((2, 4)), np.ones((1, 4)))


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (None, DEFAULT_WEIGHTS),
        ({"color_loss": 1}, {"visual_loss": 0.0, "fashion_clip_loss": 0.0, "color_loss": 1.0}),
        (
            {"visual_loss": 0.5, "fashion_clip_loss": 0.5, "color_loss": 0.0},
            {"visual_loss": 0.5, "fashion_clip_loss": 0.5, "color_loss": 0.0},
        ),
    ],
)
def test_resolve_weights(weights: dict | None, expected: dict) -> None:
    assert resolve_weights(weights) == expected


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"colour_loss": 0.2}, "did you mean 'color_loss'"),
        ({"fid": 1.0}, "valid keys"),
        ({"visual_loss": -0.1}, "must be a number >= 0"),
        ({"visual_loss": float("nan")}, "must be a number >= 0"),
        ({"visual_loss": True}, "must be a number >= 0"),
        ({"visual_loss": "0.2"}, "must be a number >= 0"),
        ({"visual_loss": 0, "color_loss": 0}, "all metric weights are 0"),
    ],
)
def test_resolve_weights_user_errors(weights: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_weights(weights)


def test_eval_score_scales_colour_to_hundred_delta_e() -> None:
    metrics = {"visual_loss": 0.3, "fashion_clip_loss": 0.4, "color_loss": 25.0}
    expected = 0.2 * 0.3 + 0.6 * 0.4 + 0.2 * 25.0 / COLOR_SCALE_DE
    assert eval_score(metrics, DEFAULT_WEIGHTS) == pytest.approx(expected)
    assert eval_score(metrics, resolve_weights({"color_loss": 1.0})) == pytest.approx(0.25)
    with pytest.raises(KeyError, match="visual_loss"):
        eval_score({"color_loss": 1.0}, DEFAULT_WEIGHTS)


def test_metric_tables_agree() -> None:
    assert METRIC_COLUMNS == ("visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score")
    assert set(HIGHER_IS_BETTER) == set(METRIC_COLUMNS) == set(METRIC_RANGES)
    assert [k for k, v in HIGHER_IS_BETTER.items() if v] == ["clip_t"]


@pytest.mark.parametrize(
    ("size", "expected"), [((20, 60), (60, 60)), ((60, 20), (60, 60)), ((30, 30), (30, 30))]
)
def test_pad_to_square_keeps_the_whole_garment(size: tuple[int, int], expected: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (200, 30, 40))
    out = pad_to_square(img)
    assert out.size == expected
    assert out.getpixel((0, 0)) == ((255, 255, 255) if size != expected else (200, 30, 40))
    assert out.getpixel((expected[0] // 2, expected[1] // 2)) == (200, 30, 40)
    reds = int(np.all(np.asarray(out) == (200, 30, 40), axis=2).sum())
    assert reds == size[0] * size[1]  # nothing cropped


# --------------------------------------------------------------------------------- model availability
@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return build_tiny_fashion_clip(root / "fclip"), build_tiny_dino(root / "dino")


def _fake_hf_cache(root: Path, repo: str, files: list[str], revision: str = "main") -> None:
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_local_tiny_model_folders_are_available(models: tuple[Path, Path]) -> None:
    clip_dir, dino_dir = models
    check_model_available(str(clip_dir), "fashion_clip")
    check_model_available(f"local-dir:{clip_dir}", "fashion_clip")
    check_model_available(str(dino_dir), "visual")


@pytest.mark.parametrize(
    ("name", "kind", "command"),
    [
        ("hf-hub:Marqo/marqo-fashionCLIP", "fashion_clip",
         "hf download Marqo/marqo-fashionCLIP open_clip_config.json open_clip_model.safetensors"),
        ("Marqo/marqo-fashionCLIP", "fashion_clip", "hf download Marqo/marqo-fashionCLIP"),
        ("facebook/dino-vits16", "visual",
         "hf download facebook/dino-vits16 config.json preprocessor_config.json model.safetensors "
         "--revision refs/pr/1"),
        ("facebook/dino-vitb16@main", "visual", "hf download facebook/dino-vitb16 config.json"),
    ],
)
def test_offline_uncached_hub_model_names_the_download_command(
    empty_hf_cache: Path, name: str, kind: str, command: str
) -> None:
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as info:
        check_model_available(name, kind)
    assert command in str(info.value)


def test_cached_hub_model_is_available_offline(empty_hf_cache: Path) -> None:
    files = ["open_clip_config.json", "open_clip_model.safetensors"]
    _fake_hf_cache(empty_hf_cache, "Marqo/marqo-fashionCLIP", files)
    check_model_available("hf-hub:Marqo/marqo-fashionCLIP", "fashion_clip")
    _fake_hf_cache(empty_hf_cache, "facebook/dino-vits16", ["config.json"], revision="refs/pr/1")
    with pytest.raises(UserError, match="preprocessor_config.json"):  # partly cached is not enough
        check_model_available("facebook/dino-vits16", "visual")


def test_uncached_hub_model_is_left_to_download_when_online(
    empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_model_available("facebook/dino-vits16", "visual")  # no error, nothing fetched here


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("./no-such-folder", "visual", "model folder not found"),
        ("local-dir:/no/such/folder", "fashion_clip", "model folder not found"),
        ("just-a-name", "visual", "neither a folder nor a Hugging Face repo id"),
        ("a/b/c", "fashion_clip", "neither a folder nor a Hugging Face repo id"),
        ("Marqo/marqo-fashionCLIP@v1", "fashion_clip", "neither a folder nor a Hugging Face repo id"),
    ],
)
def test_bad_model_settings_are_user_errors(name: str, kind: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_model_available(name, kind)


def test_folder_missing_safetensors_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="lacks preprocessor_config.json, model.safetensors"):
        check_model_available(str(tmp_path), "visual")
    with pytest.raises(ValueError, match="unknown model kind"):
        check_model_available(str(tmp_path), "dino")


# ------------------------------------------------------------------------------ Scorer, tiny models
@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("refs")
    paths = []
    for i, color in enumerate([RED, (180, 20, 50), (210, 50, 30)]):
        path = folder / f"ref{i}.png"
        garment(color, height=64 + 16 * i).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def scorer(models: tuple[Path, Path], cache_dir: Path) -> Scorer:
    return Scorer(str(models[0]), str(models[1]), cache_dir=cache_dir)


def test_image_against_itself_scores_zero(scorer: Scorer, refs: list[Path]) -> None:
    assert scorer.set_references(refs[:1]) == []
    same = Image.open(refs[0]).convert("RGB")
    for images in ([same], [same, same.copy(), same.copy()]):
        result = scorer.score(images)
        assert list(result) == ["visual_loss", "fashion_clip_loss", "color_loss", "eval_score"]
        for key, value in result.items():
            assert value == pytest.approx(0.0, abs=1e-5), key


def test_scores_are_finite_in_range_and_mean_something(scorer: Scorer, refs: list[Path]) -> None:
    scorer.set_references(refs)
    near = scorer.score([garment(RED)], prompts=["a photo of a red dress, sks style"])
    far = scorer.score([garment(NAVY)], prompts=["a photo of a navy dress, sks style"])
    for result in (near, far):
        assert list(result) == list(METRIC_COLUMNS)
        for key, value in result.items():
            low, high = METRIC_RANGES[key]
            assert math.isfinite(value) and low <= value <= high, (key, value)
    assert far["color_loss"] > near["color_loss"] + 20
    assert far["visual_loss"] > near["visual_loss"]
    assert far["fashion_clip_loss"] > near["fashion_clip_loss"]
    assert far["eval_score"] > near["eval_score"]
    expected = eval_score(far, DEFAULT_WEIGHTS)
    assert far["eval_score"] == pytest.approx(expected)


def test_score_argument_errors(scorer: Scorer, refs: list[Path]) -> None:
    scorer.set_references(refs)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score([garment(RED)] * 2, prompts=["only one"])
    with pytest.raises(ValueError, match="at least one image"):
        scorer.score([])


def test_second_scorer_reads_references_from_the_disk_cache(
    scorer: Scorer,
    models: tuple[Path, Path],
    refs: list[Path],
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scorer.set_references(refs)
    first = scorer.score([garment(NAVY)], prompts=["navy dress"])
    fresh = Scorer(str(models[0]), str(models[1]), cache_dir=cache_dir)

    def no_model(*_: object) -> None:
        raise AssertionError("reference features should have come from the cache")

    with monkeypatch.context() as mp:
        mp.setattr(fresh._clip, "embed_images", no_model)
        mp.setattr(fresh._dino, "embed_images", no_model)
        assert fresh.set_references(refs) == []
    assert (fresh.cache_hits, fresh.cache_misses) == (len(refs), 0)
    second = fresh.score([garment(NAVY)], prompts=["navy dress"])
    assert second == pytest.approx(first, abs=1e-6)


def test_corrupt_reference_is_skipped_with_a_warning(
    scorer: Scorer, refs: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "gone.jpg"
    warnings = scorer.set_references([refs[0], bad, missing])
    assert len(warnings) == 2
    assert warnings[0].startswith(f"skipped unreadable image: {bad} (")
    assert warnings[1].startswith(f"skipped unreadable image: {missing} (")
    assert scorer.reference_paths == [refs[0]]
    assert scorer.score([Image.open(refs[0]).convert("RGB")])["eval_score"] == pytest.approx(0.0, abs=1e-5)


def test_zero_usable_references_is_a_user_error(scorer: Scorer, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match="no usable reference images"):
        scorer.set_references([bad])
    with pytest.raises(UserError, match="no usable reference images"):
        scorer.set_references([])


def test_score_before_references_is_a_bug(models: tuple[Path, Path]) -> None:
    fresh = Scorer(str(models[0]), str(models[1]), weights={"color_loss": 1.0})
    assert fresh.weights == {"visual_loss": 0.0, "fashion_clip_loss": 0.0, "color_loss": 1.0}
    with pytest.raises(RuntimeError, match="set_references"):
        fresh.score([garment(RED)])


def test_tiny_models_are_deterministic_and_reused(tmp_path: Path, models: tuple[Path, Path]) -> None:
    a = build_tiny_dino(tmp_path / "a")
    b = build_tiny_dino(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (models[1] / "model.safetensors").read_bytes()
    before = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_dino(a) == a and (a / "model.safetensors").stat().st_mtime_ns == before
    other = build_tiny_dino(tmp_path / "a", seed=1)  # another recipe rebuilds in place
    assert (other / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
