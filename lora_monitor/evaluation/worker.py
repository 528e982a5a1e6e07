"""The evaluation side of a run, shared by `train` and `eval-dir`: models loaded once, checkpoints
evaluated in a worker thread (generate, save images, score), results handed back as EvalResult events.

An error while evaluating one checkpoint becomes an EvalResult with the reason; it never reaches the
trainer and never stops the run.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_monitor.checkpoints.files import read_header, tensor_fingerprint
from lora_monitor.columns import BASELINE
from lora_monitor.cpu_share import lower_this_thread
from lora_monitor.errors import EvalError, UserError
from lora_monitor.evaluation.image_plan import MAIN, ImagePlan, build_plan
from lora_monitor.evaluation.inputs import Inputs
from lora_monitor.evaluation.memorisation import COPY_THRESHOLD, CopyIndex
from lora_monitor.evaluation.prompts import Prompt
from lora_monitor.evaluation.references import load_image
from lora_monitor.events import CheckpointReady, EvalDisabled, EvalResult, EvalWarning
from lora_monitor.policies.eval_schedule import EvalQueue
from lora_monitor.tracking.plan_record import write_plan_record

if TYPE_CHECKING:
    from lora_monitor.evaluation.evaluator import Generated
    from lora_monitor.run_spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Heavy objects, built once per run."""

    evaluator: object
    scorer: object
    output_dir: Path  # eval/<stem>/ below it holds each checkpoint's images, or error.txt when it failed
    warnings: list[str] = field(default_factory=list)
    plan: ImagePlan | None = None  # which images are the evaluation prompts' and which the held-out ones
    copies: CopyIndex | None = None  # the references, prepared once for copy_distance
    copy_threshold: float = COPY_THRESHOLD
    strengths: tuple[float, ...] = ()  # extra LoRA scales to evaluate at, besides 1.0

    def evaluate(self, item: object, fingerprints: dict[str, tuple[str, dict]]) -> EvalResult:
        """One queued item's result (kohya_samples.SampleModels scores kohya's images instead)."""
        assert isinstance(item, CheckpointReady)
        return evaluate_one(self, item, fingerprints)


def quiet_libraries() -> None:
    """Progress bars of diffusers/transformers/hf-hub would garble the live table and the plain log."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def build_models(spec: RunSpec, inputs: Inputs) -> Models:
    quiet_libraries()
    config = spec.config
    from lora_monitor.evaluation.evaluator import Evaluator
    from lora_monitor.evaluation.metrics import Scorer
    from lora_monitor.evaluation.pipeline_loading import load_pipeline, resolve_device

    device = resolve_device(config.eval.device)
    scorer = Scorer(
        config.metrics.fashion_clip_model,
        config.metrics.visual_model,
        weights=dict(config.metrics.weights),
        device=str(device),
        cache_dir=spec.cache_dir,
    )
    warnings = list(scorer.set_references(inputs.references))
    pipe = load_pipeline(str(spec.base_model), spec.sdxl, device, memory=config.eval.memory, family=spec.family,
                         parts=dict(spec.model_parts))
    warnings += long_prompt_warnings(pipe, [*inputs.prompts, *inputs.holdout])
    plan = build_plan(inputs.prompts, inputs.holdout, config.eval.seeds_per_prompt, config.eval.seed)
    evaluator = Evaluator(pipe, list(plan.prompts), spec.eval_config, spec.output_dir)
    copies = CopyIndex([load_image(p) for p in scorer.reference_paths])
    # what the report shows beside the generated images: the references used and which prompts are held out
    write_plan_record(spec.output_dir, scorer.reference_paths, plan)
    strengths = tuple(s for s in dict.fromkeys(config.eval.strengths) if s != 1.0)
    return Models(evaluator=evaluator, scorer=scorer, output_dir=spec.output_dir, warnings=warnings, plan=plan,
                  copies=copies, copy_threshold=config.metrics.copy_threshold, strengths=strengths)


def judge(models: Models, generated: Generated) -> dict[str, float]:
    """The metrics against the references (on the evaluation prompts' images) and the over-training signals."""
    from lora_monitor.evaluation.signals import overtraining_signals

    images = generated.images
    if models.plan is None:  # a plan of the evaluation prompts alone, one seed each
        return models.scorer.score(images, generated.prompts)  # type: ignore[attr-defined]
    main_images = [images[i] for i in models.plan.indices(MAIN)]
    # one DINO pass serves visual_loss and diversity
    visual = models.scorer.embed_visual(main_images) if main_images else None  # type: ignore[attr-defined]
    metrics = models.scorer.score(main_images, models.plan.texts(MAIN),  # type: ignore[attr-defined]
                                  visual_embeddings=visual)
    metrics.update(overtraining_signals(models.scorer, models.copies, models.copy_threshold, models.plan, images,
                                        main_visual=visual))
    return metrics


def evaluate_baseline(models: Models) -> EvalResult:
    """The base model without a LoRA, with the run's prompts and seeds: the row every signal is read against."""
    started = time.monotonic()
    path = Path(BASELINE)
    try:
        generated = models.evaluator.generate_base()  # type: ignore[attr-defined]
        models.evaluator.save(path, 0, generated)  # type: ignore[attr-defined]
        metrics = judge(models, generated)
        return EvalResult(path, 0, metrics, seconds=time.monotonic() - started, baseline=True)
    except Exception as exc:  # noqa: BLE001 - evaluation problems never kill the run
        where = _keep_traceback(models.output_dir, path, traceback.format_exc())
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return EvalResult(path, 0, error=f"baseline failed: {last[:300]}{where}", baseline=True,
                          seconds=time.monotonic() - started)


def long_prompt_warnings(pipe: object, prompts: list[Prompt]) -> list[str]:
    """The text encoder reads at most model_max_length tokens (77 for CLIP); longer prompts are cut."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return []
    limit = int(getattr(tokenizer, "model_max_length", 77))
    out = []
    for i, prompt in enumerate(prompts, start=1):
        n = len(tokenizer(prompt.text, truncation=False)["input_ids"])
        if n > limit:
            out.append(f"prompt {i} is {n} tokens; the text encoder reads {limit}, the rest is cut: "
                       f"{prompt.text[:60]!r}...")
    return out


def evaluate_one(models: Models, ready: CheckpointReady, fingerprints: dict[str, tuple[str, dict]]) -> EvalResult:
    """Generate + save + score one checkpoint; every failure becomes an EvalResult.error."""
    started = time.monotonic()
    path = ready.path
    try:
        if not path.exists():
            return EvalResult(path, ready.step, note="deleted before its turn (kohya's save_last_n_*)", skipped=True)
        try:
            fp = tensor_fingerprint(path, read_header(path))
        except (OSError, ValueError) as exc:
            raise EvalError(f"not a readable safetensors file ({exc})") from None
        if fp in fingerprints:
            twin, metrics = fingerprints[fp]
            return EvalResult(path, ready.step, dict(metrics), note=f"same weights as {twin}; not generated again")
        generated = models.evaluator.generate(path)  # type: ignore[attr-defined]
        models.evaluator.save(path, ready.step, generated)  # type: ignore[attr-defined]
        metrics = judge(models, generated)
        extra = models.evaluator.at_strengths(list(models.strengths)) if models.strengths else {}  # type: ignore[attr-defined]
        by_strength = {s: judge(models, images) for s, images in extra.items()}
        fingerprints[fp] = (path.name, dict(metrics))
        return EvalResult(path, ready.step, dict(metrics), seconds=time.monotonic() - started,
                          by_strength=by_strength)
    except EvalError as exc:
        if not path.exists():
            return EvalResult(path, ready.step, note="deleted while being evaluated", skipped=True)
        return EvalResult(path, ready.step, error=str(exc), seconds=time.monotonic() - started)
    except Exception as exc:  # noqa: BLE001 - evaluation problems never kill the run
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        elapsed = time.monotonic() - started
        where = _keep_traceback(models.output_dir, path, traceback.format_exc())
        return EvalResult(path, ready.step, error=f"evaluation failed: {last[:300]}{where}", seconds=elapsed)


def _keep_traceback(output_dir: Path, checkpoint: Path, text: str) -> str:
    """Write the traceback of a failed evaluation to eval/<stem>/error.txt; the row's note points at it."""
    from lora_monitor.run_spec import eval_folder

    target = eval_folder(output_dir, checkpoint) / "error.txt"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        log.error("evaluation of %s failed:\n%s(traceback not saved: %s)", checkpoint.name, text, exc)
        return ""
    return f" (traceback: {target.relative_to(output_dir)})"


class EvalWorker:
    """A thread that evaluates queued checkpoints (newest first while training) and reports results."""

    def __init__(
        self,
        load: Callable[[], Models],
        on_result: Callable[[object], None],
        newest_first: bool = True,
        threads: int | None = None,
        nice: int = 0,
        baseline: bool = False,
    ) -> None:
        """`threads`: torch's thread count for evaluating (None: torch's default); `nice`: how much lower the
        worker thread runs than the rest of the monitor (see lora_monitor/cpu_share.py)."""
        self.queue = EvalQueue(newest_first=newest_first)
        self._load = load
        self._on_result = on_result
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)
        self.models: Models | None = None
        self.load_error: str | None = None
        self.busy_with: Path | None = None
        self.fingerprints: dict[str, tuple[str, dict]] = {}
        self._threads = threads
        self._nice = nice
        self._baseline = baseline  # evaluate the base model first (the run's CSV has no baseline row yet)

    def start(self) -> None:
        self._thread.start()

    def submit(self, ready: CheckpointReady) -> None:
        # kohya's first samples (source = "kohya_samples") are the baseline: scored before any checkpoint
        self.queue.push(ready, ready.step, first=bool(getattr(ready, "baseline", False)))
        self._wake.set()

    def close(self, timeout: float | None = None, backfill: bool = True) -> list[CheckpointReady]:
        """Finish what is queued (oldest first, as a backfill) then stop; returns what was dropped."""
        dropped: list[CheckpointReady] = []
        if not backfill:
            dropped = self.queue.backfill()
        self.queue.newest_first = False
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        return dropped

    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> list[CheckpointReady]:
        return self.queue.pending()

    def _next(self) -> CheckpointReady | None:
        return self.queue.pop()

    def _setup_thread(self) -> None:
        """In the worker thread, before torch starts its OpenMP threads from it (they inherit the priority)."""
        lower_this_thread(self._nice)
        if self._threads is not None:
            import torch

            # process-wide, but kohya is another process and nothing else in the monitor computes with torch
            torch.set_num_threads(self._threads)

    def _run(self) -> None:
        self._setup_thread()
        try:
            self.models = self._load()
            for w in self.models.warnings:
                self._on_result(EvalWarning(w))
            if self._baseline:
                self.busy_with = Path(BASELINE)
                self._on_result(evaluate_baseline(self.models))
                self.busy_with = None
        except UserError as exc:
            self.load_error = str(exc)
            self._on_result(EvalDisabled(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a broken evaluator must not take the trainer down
            self.load_error = f"evaluator could not start: {exc}"
            self._on_result(EvalDisabled(self.load_error))
        while True:
            item = self._next()
            if item is None:
                if self._closing.is_set():
                    return
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            if self.models is None:
                self._on_result(EvalResult(item.path, item.step, error=self.load_error or "evaluator not loaded"))
                continue
            self.busy_with = item.path
            self._on_result(self.models.evaluate(item, self.fingerprints))
            self.busy_with = None


def drain(q: queue.Queue, timeout: float) -> list[object]:
    """Everything in q, waiting up to `timeout` for the first item."""
    items = []
    try:
        items.append(q.get(timeout=timeout))
        while True:
            items.append(q.get_nowait())
    except queue.Empty:
        pass
    return items
