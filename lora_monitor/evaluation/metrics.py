"""Scores of a checkpoint's generated images against the reference (training) images.

Metrics (g = generated images, r = reference images, ĝ r̂ = unit-length embeddings):

- fashion_clip_loss = 1 − mean over all pairs (i, j) of ĝᵢ·r̂ⱼ with FashionCLIP (open_clip) image embeddings.
  Range [0, 2], lower is better.
- visual_loss = the same with DINO ViT CLS embeddings. Range [0, 2], lower is better.
- color_loss = sliced Wasserstein distance of the Lab colour distributions, background removed
  (lora_monitor.evaluation.color). ΔE-like units, 0 = same colours, lower is better.
- clip_t = mean cosine between each generated image and its own prompt (FashionCLIP text tower).
  Range [−1, 1], higher is better.
- eval_score = Σ weight · term, with term = the loss itself for the two embedding losses and
  color_loss / COLOR_SCALE_DE for colour (ΔE 100, black vs white, counts as 1). Lower is better.

A pairwise mean is not 0 for a set of different references scored against themselves: the references'
own spread is the floor a checkpoint can reach. Images are padded to a square with white before either model's
preprocessing, so tall garments are shrunk rather than cropped.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_monitor.columns import DEFAULT_WEIGHTS, HIGHER_IS_BETTER, LOSS_KEYS, METRIC_NAMES, METRIC_RANGES
from lora_monitor.errors import UserError
from lora_monitor.evaluation.color import COLOR_STATS_VERSION, color_stats, pool_stats, stats_distance
from lora_monitor.evaluation.references import ReferenceFeatureCache, UnreadableImageError, file_digest, load_image

__all__ = [
    "COLOR_SCALE_DE",
    "DEFAULT_WEIGHTS",
    "HIGHER_IS_BETTER",
    "METRIC_COLUMNS",
    "METRIC_RANGES",
    "Scorer",
    "check_model_available",
    "clip_t_score",
    "eval_score",
    "pad_to_square",
    "pairwise_cosine_loss",
    "resolve_weights",
]

METRIC_COLUMNS = METRIC_NAMES  # the order of score()'s keys
# color_loss is in ΔE-like units; dividing by 100 (black vs white) brings it near the [0, 2] scale of the
# embedding losses before weighting.
COLOR_SCALE_DE = 100.0
# Part of the cache key of reference embeddings: change it when image preparation changes.
_EMBED_PREP_VERSION = "pad-white-v1"
_BATCH = 16


# ----------------------------------------------------------------------------------------------- pure math
def _unit_rows(emb: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim != 2 or len(arr) == 0:
        raise ValueError(f"{what}: expected a non-empty (n, d) array, got shape {arr.shape}")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError(f"{what}: embeddings must be finite and non-zero")
    return arr / norms


def pairwise_cosine_loss(gen_emb: np.ndarray, ref_emb: np.ndarray) -> float:
    """1 − mean over all pairs (i, j) of cos(genᵢ, refⱼ); inputs (n, d) and (m, d), any length rows.

    Symmetric in its arguments; range [0, 2]; 0 only when every generated embedding points the same way
    as every reference embedding.
    """
    g = _unit_rows(gen_emb, "generated embeddings")
    r = _unit_rows(ref_emb, "reference embeddings")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"embedding sizes differ: {g.shape[1]} vs {r.shape[1]}")
    return float(np.clip(1.0 - (g @ r.T).mean(), 0.0, 2.0))


def clip_t_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean cosine between row i of `image_emb` and row i of `text_emb` (image vs its own prompt); [−1, 1]."""
    im = _unit_rows(image_emb, "image embeddings")
    tx = _unit_rows(text_emb, "text embeddings")
    if im.shape != tx.shape:
        raise ValueError(f"one prompt per image needed: image {im.shape} vs text {tx.shape} embeddings")
    return float(np.clip((im * tx).sum(axis=1).mean(), -1.0, 1.0))


def resolve_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Validated eval_score weights; None gives DEFAULT_WEIGHTS, a missing key weighs 0."""
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    resolved = dict.fromkeys(LOSS_KEYS, 0.0)
    for key, value in weights.items():
        if key not in resolved:
            close = difflib.get_close_matches(str(key), LOSS_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(LOSS_KEYS)}"
            raise UserError(f"unknown metric weight {key!r}; {hint}")
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value) or value < 0:
            raise UserError(f"metric weight {key!r} must be a number >= 0, got {value!r}")
        resolved[key] = float(value)
    if sum(resolved.values()) == 0:
        raise UserError(f"all metric weights are 0; give at least one of {', '.join(LOSS_KEYS)} a weight > 0")
    return resolved


def eval_score(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted sum of the losses; colour enters as color_loss / COLOR_SCALE_DE. Lower is better."""
    total = 0.0
    for key, weight in weights.items():
        if weight == 0:
            continue
        if key not in metrics:
            raise KeyError(f"eval_score needs {key!r}; metrics present: {', '.join(metrics)}")
        term = metrics[key] / COLOR_SCALE_DE if key == "color_loss" else metrics[key]
        total += weight * term
    return float(total)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """`image` centred on a white square canvas, so a model's centre crop cannot cut off a tall garment."""
    from lora_monitor.evaluation.references import to_rgb_on_white

    rgb = to_rgb_on_white(image)  # transparent pixels are white, as for image files
    side = max(rgb.size)
    if rgb.width == rgb.height:
        return rgb
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return canvas


# ------------------------------------------------------------------------------------------- model sources
_REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "fashion_clip": ("open_clip_config.json", "open_clip_model.safetensors"),
    "visual": ("config.json", "preprocessor_config.json", "model.safetensors"),
}
_KIND_LABELS = {"fashion_clip": "FashionCLIP", "visual": "visual (DINO)"}
# facebook/dino-vits16 has only a pickle on main; its safetensors weights are on the hub's conversion PR.
_SAFETENSORS_REVISIONS = {"facebook/dino-vits16": "refs/pr/1"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class _ModelSource:
    """Where a scoring model comes from: a local folder, or a Hugging Face repo (+ revision)."""

    name: str
    kind: str
    local_dir: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def required_files(self) -> tuple[str, ...]:
        return _REQUIRED_FILES[self.kind]

    def cached_file(self, filename: str) -> Path | None:
        """Path of `filename` in the local folder or the HF cache; None when absent."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            return path if path.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id or "", filename, revision=self.revision)
        return Path(found) if isinstance(found, str) else None

    def download_command(self) -> str:
        revision = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id} {' '.join(self.required_files)}{revision}"

    def fix_hint(self) -> str:
        if self.local_dir is not None:
            return f"the folder must hold {', '.join(self.required_files)}"
        return f"get it once with `{self.download_command()}` or pass a local model folder"

    def ensure_files(self) -> None:
        """Fetch the required files of a hub model (no-op when cached), so only safetensors get loaded."""
        if self.local_dir is not None or all(self.cached_file(f) for f in self.required_files):
            return
        from huggingface_hub import hf_hub_download

        for filename in self.required_files:
            try:
                hf_hub_download(self.repo_id or "", filename, revision=self.revision)
            except Exception as exc:  # hub errors have many types; all mean "not obtainable"
                raise UserError(f"cannot get {filename} of {_KIND_LABELS[self.kind]} model {self.repo_id} "
                                f"({type(exc).__name__}: {exc}); {self.fix_hint()}") from exc

    def fingerprint(self) -> str:
        """Identity of the weights for cache keys: their resolved path (hub: includes commit), size, mtime."""
        weights = self.cached_file(self.required_files[-1])
        if weights is None:
            return f"{self.name}@{self.revision or 'main'}"
        st = weights.stat()
        return f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def open_clip_spec(self) -> str:
        return f"local-dir:{self.local_dir}" if self.local_dir is not None else f"hf-hub:{self.repo_id}"

    def transformers_args(self) -> tuple[str, dict]:
        if self.local_dir is not None:
            return str(self.local_dir), {}
        return self.repo_id or "", {"revision": self.revision, "local_files_only": _hub_offline()}


def _resolve_source(name: str, kind: str) -> _ModelSource:
    """Read a model setting: a folder (plain path or `local-dir:PATH`) or `[hf-hub:]org/name[@revision]`.

    Revisions are accepted for the visual model only (open_clip loads hub models from their main branch).
    """
    if kind not in _REQUIRED_FILES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(_REQUIRED_FILES)}")
    label = _KIND_LABELS[kind]
    text = name.strip()
    if text.startswith("local-dir:") or Path(text).expanduser().is_dir():
        folder = Path(text.removeprefix("local-dir:")).expanduser()
        if not folder.is_dir():
            raise UserError(f"{label} model folder not found: {folder}; check the model setting")
        return _ModelSource(name, kind, local_dir=folder.resolve())
    if text.startswith(("/", ".", "~")) or "\\" in text:
        raise UserError(f"{label} model folder not found: {text}; check the model setting")
    repo, _, revision = text.removeprefix("hf-hub:").partition("@")
    if not _REPO_ID.match(repo) or (revision and kind == "fashion_clip"):
        form = "org/name" if kind == "fashion_clip" else "org/name[@revision]"
        raise UserError(f"{label} model {name!r} is neither a folder nor a Hugging Face repo id ({form}); "
                        "fix the model setting")
    return _ModelSource(name, kind, repo_id=repo, revision=revision or _SAFETENSORS_REVISIONS.get(repo))


def check_model_available(name: str, kind: str) -> None:
    """Fail early, in one line, when a scoring model cannot be loaded.

    `kind` is "fashion_clip" (open_clip layout) or "visual" (transformers ViT). A local folder must hold the
    required files; a hub model must be in the HF cache unless downloads are allowed (HF_HUB_OFFLINE unset).
    The error names the model and the exact command that fetches it.
    """
    source = _resolve_source(name, kind)
    missing = [f for f in source.required_files if source.cached_file(f) is None]
    if not missing:
        return
    label = _KIND_LABELS[kind]
    if source.local_dir is not None:
        raise UserError(f"{label} model folder {source.local_dir} lacks {', '.join(missing)}; "
                        f"{source.fix_hint()} (safetensors weights only)")
    if _hub_offline():
        raise UserError(f"{label} model {source.repo_id} is not a local folder and not in the Hugging Face "
                        f"cache, and HF_HUB_OFFLINE is set; get it once with `{source.download_command()}` "
                        "(network needed) or pass a local model folder")


# --------------------------------------------------------------------------------------------- embedders
def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class _FashionClip:
    """open_clip model + preprocessing + tokenizer, loaded once."""

    def __init__(self, source: _ModelSource, device: str) -> None:
        import open_clip

        spec = source.open_clip_spec()
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(spec, device=device)
            self.tokenizer = open_clip.get_tokenizer(spec)
        except (OSError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"cannot load FashionCLIP model {source.name!r} ({exc}); {source.fix_hint()}"
            ) from exc
        self.model.eval()
        self.device = device

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for batch in _batches(images, _BATCH):
            x = torch.stack([self.preprocess(pad_to_square(im)) for im in batch]).to(self.device)
            out.append(self.model.encode_image(x).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for batch in _batches(list(texts), _BATCH):
            tokens = self.tokenizer(list(batch)).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


class _Dino:
    """transformers ViT (DINO) + its image processor; the embedding is the CLS token of the last layer."""

    def __init__(self, source: _ModelSource, device: str) -> None:
        from transformers import AutoImageProcessor, ViTModel
        from transformers.utils import logging as hf_logging

        where, kwargs = source.transformers_args()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a tqdm bar would tear the live table
        try:
            self.model = ViTModel.from_pretrained(
                where, add_pooling_layer=False, use_safetensors=True, **kwargs
            )
            self.processor = AutoImageProcessor.from_pretrained(where, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot load visual model {source.name!r} ({exc}); {source.fix_hint()}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.model.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = []
        for batch in _batches(images, _BATCH):
            pixels = self.processor(images=[pad_to_square(im) for im in batch], return_tensors="pt")
            hidden = self.model(pixel_values=pixels["pixel_values"].to(self.device)).last_hidden_state
            out.append(hidden[:, 0].float().cpu().numpy())
        return np.concatenate(out).astype(np.float32)


# ------------------------------------------------------------------------------------------------ scorer
class Scorer:
    """Scores generated images against a fixed set of references. Build once per run; models load here.

    Use: `scorer.set_references(paths)` once, then `scorer.score(images, prompts)` per checkpoint.
    """

    def __init__(
        self,
        fashion_clip_model: str,
        visual_model: str,
        weights: dict[str, float] | None = None,
        device: str = "cpu",
        cache_dir: Path | None = None,
    ) -> None:
        self.weights = resolve_weights(weights)
        clip_source = _resolve_source(fashion_clip_model, "fashion_clip")
        dino_source = _resolve_source(visual_model, "visual")
        check_model_available(fashion_clip_model, "fashion_clip")
        check_model_available(visual_model, "visual")
        clip_source.ensure_files()
        dino_source.ensure_files()
        self._clip = _FashionClip(clip_source, device)
        self._dino = _Dino(dino_source, device)
        self._cache = ReferenceFeatureCache(Path(cache_dir)) if cache_dir is not None else None
        self._feature_keys = {
            "fashion_clip": f"fashion_clip|{clip_source.fingerprint()}|{_EMBED_PREP_VERSION}",
            "visual": f"visual|{dino_source.fingerprint()}|{_EMBED_PREP_VERSION}",
            "color": f"color|{COLOR_STATS_VERSION}",
        }
        self._refs: dict[str, np.ndarray] | None = None
        self.reference_paths: list[Path] = []
        self.cache_hits = 0  # references of the last set_references() read whole from the disk cache
        self.cache_misses = 0

    def set_references(self, paths: list[Path]) -> list[str]:
        """Embed the references and summarise their colours, once; returns warnings for skipped files.

        Each reference's features are cached under cache_dir, keyed by model and file content hash, so a
        restart reads them back instead of running the models. Raises UserError if no reference is usable.
        """
        problems: dict[Path, str] = {}
        feats: dict[Path, dict[str, np.ndarray]] = {}
        pending: list[tuple[Path, str]] = []
        self.cache_hits = self.cache_misses = 0
        for path in paths:
            path = Path(path)
            try:
                digest = file_digest(path)
            except OSError as exc:
                problems[path] = f"skipped unreadable image: {path} ({exc.strerror or exc})"
                continue
            cached = self._cache.get_all(self._feature_keys, digest) if self._cache else None
            if cached is not None:
                feats[path] = cached
                self.cache_hits += 1
            else:
                pending.append((path, digest))
        for chunk in _batches(pending, _BATCH):
            images, kept = [], []
            for path, digest in chunk:
                try:
                    images.append(load_image(path))
                    kept.append((path, digest))
                except UnreadableImageError as exc:
                    problems[path] = f"skipped unreadable image: {path} ({_reason(exc)})"
            for (path, digest), features in zip(kept, self._features(images), strict=True):
                feats[path] = features
                self.cache_misses += 1
                if self._cache:
                    self._cache.put_all(self._feature_keys, digest, features)
        warnings = [problems[Path(p)] for p in paths if Path(p) in problems]  # in the order given
        usable = [Path(p) for p in paths if Path(p) in feats]
        if not usable:
            raise UserError(f"no usable reference images: {len(paths)} given, none readable; add readable "
                            "training images (.png .jpg .jpeg .webp .bmp) to the reference folder")
        self.reference_paths = usable
        self._refs = {
            "fashion_clip": np.stack([feats[p]["fashion_clip"] for p in usable]),
            "visual": np.stack([feats[p]["visual"] for p in usable]),
            "color": pool_stats([feats[p]["color"] for p in usable]),
        }
        return warnings

    def _features(self, images: list[Image.Image]) -> list[dict[str, np.ndarray]]:
        if not images:
            return []
        clip = self._clip.embed_images(images)
        dino = self._dino.embed_images(images)
        return [
            {"fashion_clip": clip[i], "visual": dino[i], "color": color_stats(im)}
            for i, im in enumerate(images)
        ]

    def embed_visual(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, d) DINO embeddings of `images` with the visual_loss model (padded to square like the metrics)."""
        if not images:
            raise ValueError("embed_visual() needs at least one image")
        return self._dino.embed_images(images)

    def text_alignment(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        """clip_t of `images` against their own prompts (one per image), without the reference metrics."""
        if not images or len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images; give one prompt per image")
        return clip_t_score(self._clip.embed_images(images), self._clip.embed_texts(list(prompts)))

    def score(self, images: list[Image.Image], prompts: list[str] | None = None,
              visual_embeddings: np.ndarray | None = None) -> dict[str, float]:
        """Metrics of `images` (one checkpoint) against the references, keys in METRIC_COLUMNS order.

        clip_t is present only when `prompts` (one per image, trigger words kept) is given.
        visual_embeddings: `embed_visual(images)` when the caller already has it (diversity uses the same).
        """
        if self._refs is None:
            raise RuntimeError("Scorer.set_references() must be called before score()")
        if not images:
            raise ValueError("score() needs at least one image")
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images; give one prompt per image")
        clip_images = self._clip.embed_images(images)
        values = {
            "visual_loss": pairwise_cosine_loss(
                self._dino.embed_images(images) if visual_embeddings is None else visual_embeddings,
                self._refs["visual"]),
            "fashion_clip_loss": pairwise_cosine_loss(clip_images, self._refs["fashion_clip"]),
            "color_loss": stats_distance(pool_stats([color_stats(im) for im in images]), self._refs["color"]),
        }
        if prompts is not None:
            values["clip_t"] = clip_t_score(clip_images, self._clip.embed_texts(prompts))
        values["eval_score"] = eval_score(values, self.weights)
        return {key: values[key] for key in METRIC_COLUMNS if key in values}


def _reason(exc: UnreadableImageError) -> str:
    """The inner reason of an unreadable-image error (its cause), without the fix-it advice."""
    cause = exc.__cause__
    if cause is None:
        return str(exc)
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
