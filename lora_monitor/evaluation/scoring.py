"""`lora-monitor score`: the same metric code over any folder of images (kohya's samples, another tool's).

Besides the metrics it gives two of the over-training signals, computed as for a checkpoint's images:
`diversity` among the images of each prompt (the `--prompts` lines, one per image: images whose lines have the
same prompt text are one group, e.g. one prompt at several seeds; without prompts, all images are one group),
and `copy_distance`/`copies` against the references (`[metrics] copy_threshold`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.evaluation.prompts import load_prompts


def score_folder(config: Config, images_dir: Path, references_dir: Path, prompts_file: Path | None) -> dict[str, Any]:
    """Score every image in `images_dir` against `references_dir`; prompts (in file order) enable clip_t and
    group the images for diversity. diversity is None when no group has two images."""
    from lora_monitor.evaluation.diversity import diversity
    from lora_monitor.evaluation.memorisation import CopyIndex, count_copies
    from lora_monitor.evaluation.metrics import Scorer
    from lora_monitor.evaluation.references import find_reference_images, load_image

    references = find_reference_images(references_dir)
    if not Path(images_dir).is_dir():
        raise UserError(f"{images_dir}: not a folder; give the folder of images to score")
    try:
        image_paths = find_reference_images(images_dir)
    except UserError:
        raise UserError(f"{images_dir}: no images to score (.png .jpg .jpeg .webp .bmp)") from None
    prompts = None
    if prompts_file:
        prompts = [p.text for p in load_prompts(prompts_file)]
        if len(prompts) != len(image_paths):
            raise UserError(
                f"{prompts_file}: {len(prompts)} prompts for {len(image_paths)} images in {images_dir}; "
                "give one prompt per image, in the images' sorted order"
            )
    images = []
    skipped = []
    for path in image_paths:
        try:
            images.append(load_image(path))
        except UserError as exc:  # load_image's UnreadableImageError: one bad file does not stop the rest
            skipped.append(str(exc))
    if not images:
        raise UserError(f"{images_dir}: no readable images to score")
    if prompts is not None and skipped:
        raise UserError(f"{skipped[0]}; clip_t needs every image readable - fix or remove it")
    scorer = Scorer(config.metrics.fashion_clip_model, config.metrics.visual_model,
                    weights=dict(config.metrics.weights), cache_dir=config.metrics.cache_dir)
    warnings = scorer.set_references(references)
    result: dict[str, Any] = dict(scorer.score(images, prompts))
    groups = prompts if prompts is not None else [""] * len(images)
    result["diversity"] = diversity(scorer.embed_visual(images), groups)
    # the references the metrics used (unreadable ones were skipped with a warning)
    distances = CopyIndex([load_image(p) for p in scorer.reference_paths]).distances(images)
    result.update(copy_distance=min(distances), copies=count_copies(distances, config.metrics.copy_threshold),
                  copy_threshold=config.metrics.copy_threshold)
    result.update(n_images=len(images), n_references=len(scorer.reference_paths),
                  skipped=skipped + list(warnings))
    return result
