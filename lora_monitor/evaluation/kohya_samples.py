"""`[eval] source = "kohya_samples"`: score the images kohya generates itself inside training, loading no
diffusion model (zero extra GPU memory: the scoring models run on the CPU unless [eval] device says otherwise).

kohya (`sample_image_inference` in library/train_util.py, the same in flux/sd3/lumina/anima/hunyuan's utils)
saves one PNG per line of its `--sample_prompts` file into `<output_dir>/sample/`, named
`{output_name}_{num}_{i:02d}_{YYYYmmddHHMMSS}[_{seed}].png`: `num` is `{step:06d}` inside an epoch
(`--sample_every_n_steps`) or `e{epoch:06d}` at an epoch's end (`--sample_every_n_epochs`; `e000000` is
`--sample_at_first`, before the first step: the untrained LoRA, i.e. the base model), `i` the prompt's line
among the non-comment lines, the seed its `--d`. A step's set is complete when every prompt has its file.

The row of a set names the LoRA file kohya saved at that step, else `sample@step N` (`sample@epoch E`). kohya
samples a step before it saves that step's file, so `train` names the row again when it is written
(`settle_name`): by then kohya has saved and logged the step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lora_monitor import events as ev
from lora_monitor.checkpoints.files import checkpoint_order, is_final_name, step_from_name, step_of
from lora_monitor.checkpoints.watcher import list_checkpoints
from lora_monitor.columns import BASELINE
from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.evaluation.image_plan import MAIN, ImagePlan
from lora_monitor.evaluation.inputs import Inputs, reference_images
from lora_monitor.evaluation.prompts import Prompt, load_prompts
from lora_monitor.evaluation.worker import EvalWorker, Models, judge, quiet_libraries
from lora_monitor.tracking.rows import epoch_from_metadata

if TYPE_CHECKING:
    from lora_monitor.run_spec import RunSpec

SOURCE = "kohya_samples"
SAMPLE_FOLDER = "sample"  # kohya: args.output_dir + "/sample"
SAMPLE_NAME_RE = re.compile(
    r"^(?P<prefix>.*?)(?P<e>e?)(?P<number>\d{6,})_(?P<index>\d{2,})_(?P<stamp>\d{14})(?:_(?P<seed>\d+))?\.png$"
)
PSEUDO_NAME_RE = re.compile(r"^sample@(?P<kind>step|epoch) (?P<number>\d+)$")
PNG_END = b"IEND\xaeB`\x82"  # the last chunk of a PNG: kohya writes in place, so a file without it is half written


def uses_samples(config: Config) -> bool:
    return config.eval.source == SOURCE


def device_name(config: Config) -> str:
    """The scoring models' device: with kohya's samples, "auto" is the CPU (no GPU memory taken from kohya)."""
    if uses_samples(config) and config.eval.device == "auto":
        return "cpu"
    return config.eval.device


# ------------------------------------------------------------------------------------------ file names
@dataclass(frozen=True)
class SampleFile:
    path: Path
    prefix: str  # "{output_name}_", or "" when kohya ran without output_name
    kind: str  # "step" or "epoch"
    number: int  # the step or the 1-based epoch (0: --sample_at_first)
    index: int  # the prompt's position in kohya's prompt file
    stamp: str  # when kohya saved it (YYYYmmddHHMMSS)
    seed: int | None


def parse_sample_name(path: Path) -> SampleFile | None:
    m = SAMPLE_NAME_RE.match(path.name)
    if m is None:
        return None
    seed = int(m["seed"]) if m["seed"] else None
    return SampleFile(path, m["prefix"], "epoch" if m["e"] else "step", int(m["number"]), int(m["index"]),
                      m["stamp"], seed)


def sample_prefix(output_name: str | None) -> str:
    return f"{output_name}_" if output_name else ""


def png_complete(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() < len(PNG_END):
                return False
            fh.seek(-len(PNG_END), os.SEEK_END)
            return fh.read() == PNG_END
    except OSError:
        return False


def newest_prefix(files: Iterable[SampleFile]) -> str | None:
    """The run name of the newest sample (eval-dir of a folder whose output_name is not known)."""
    newest = max(files, key=lambda f: (f.stamp, f.path.name), default=None)
    return newest.prefix if newest else None


# ------------------------------------------------------------------------------------------ sets
@dataclass(frozen=True)
class SampleSet:
    """kohya's images of one sampling: queued like a checkpoint (`path` is the row's checkpoint)."""

    path: Path
    step: int | None
    files: tuple[Path, ...]  # by prompt index
    kind: str = "step"
    number: int = 0
    baseline: bool = False
    is_final: bool = False


def pseudo_path(output_dir: Path, kind: str, number: int) -> Path:
    return output_dir / f"sample@{kind} {number}"


def lora_at(output_dir: Path, output_name: str | None, kind: str, number: int) -> Path | None:
    """The LoRA file kohya saved at this step (kind "step") or at the end of this epoch (kind "epoch")."""
    files = sorted(list_checkpoints(output_dir), key=lambda p: checkpoint_order(p, output_name))
    if kind == "step":
        return next((p for p in files if step_of(p) == number), None)
    named = [p for p in files if step_from_name(p)[1] == number]
    if named:
        return named[0]
    # the last epoch has no epoch file: kohya saves the final file (ss_epoch = the epoch count) instead
    return next((p for p in files if is_final_name(p, output_name) and epoch_from_metadata(p) == number), None)


def complete_sets(files: Iterable[SampleFile], n_prompts: int) -> dict[tuple[str, int], tuple[Path, ...]]:
    """(kind, number) -> its files by prompt index, for every sampling that has all `n_prompts` images.

    A prompt with several files (kohya run twice into the folder) takes its newest.
    """
    by_key: dict[tuple[str, int], dict[int, SampleFile]] = {}
    for f in files:
        slot = by_key.setdefault((f.kind, f.number), {})
        if f.index not in slot or (f.stamp, f.path.name) > (slot[f.index].stamp, slot[f.index].path.name):
            slot[f.index] = f
    out = {}
    for key, slot in by_key.items():
        if all(i in slot for i in range(n_prompts)) and all(png_complete(slot[i].path) for i in range(n_prompts)):
            out[key] = tuple(slot[i].path for i in range(n_prompts))
    return out


def order_key(key: tuple[str, int]) -> tuple[int, int]:
    return (key[1], 0) if key[0] == "step" else (-1 if key[1] == 0 else key[1], 1)


class SampleFolder:
    """The complete, not yet handed over samplings in `<output_dir>/sample/`, in training order."""

    def __init__(self, spec: RunSpec, n_prompts: int, ignore: Iterable[Path] = (), resumed: bool = False,
                 done: Iterable[str] = ()) -> None:
        self.spec = spec
        self.folder = spec.output_dir / SAMPLE_FOLDER
        self.n_prompts = n_prompts
        self.prefix: str | None = sample_prefix(spec.output_name) if spec.output_name or spec.kohya else None
        self.ignore = {p.name for p in ignore}
        self.resumed = resumed  # a resumed run's e000000 is not the base model: not a baseline
        self.done = set(done)  # rows already in the CSV
        self.handed: set[tuple[str, int]] = set()
        self.unmatched: set[int] = set()  # prompt indices beyond the prompt file (another prompt file)

    def files(self) -> list[SampleFile]:
        if not self.folder.is_dir():
            return []
        found = [f for p in self.folder.iterdir() if p.name not in self.ignore and (f := parse_sample_name(p))]
        prefix = self.prefix if self.prefix is not None else newest_prefix(found)
        found = [f for f in found if f.prefix == prefix]
        self.unmatched |= {f.index for f in found if f.index >= self.n_prompts}
        return found

    def new_sets(self) -> list[SampleSet]:
        out = []
        for key, paths in sorted(complete_sets(self.files(), self.n_prompts).items(), key=lambda kv: order_key(kv[0])):
            if key in self.handed:
                continue
            self.handed.add(key)
            item = self.as_set(key, paths)
            if item is not None and item.path.name not in self.done:
                out.append(item)
        return out

    def as_set(self, key: tuple[str, int], paths: tuple[Path, ...]) -> SampleSet | None:
        kind, number = key
        if kind == "epoch" and number == 0:
            if self.resumed:
                return None
            return SampleSet(Path(BASELINE), 0, paths, kind, number, baseline=True)
        lora = lora_at(self.spec.output_dir, self.spec.output_name, kind, number)
        step = number if kind == "step" else (step_of(lora) if lora else None)
        path = lora or pseudo_path(self.spec.output_dir, kind, number)
        return SampleSet(path, step, paths, kind, number, is_final=is_final_name(path, self.spec.output_name))


class SampleWatcher:
    """A thread that hands each sampling over (`on_set`) once all its images are written; stop() scans last."""

    def __init__(self, samples: SampleFolder, on_set: Callable[[SampleSet], None], rescan_s: float = 1.0) -> None:
        self.samples = samples
        self._on_set = on_set
        self._rescan_s = rescan_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sample-watcher", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def scan(self) -> None:
        with self._lock:
            for item in self.samples.new_sets():
                self._on_set(item)

    def _run(self) -> None:
        while not self._stop.wait(self._rescan_s):
            self.scan()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.scan()  # kohya has ended: its last images are complete now


def scheduled(spec: RunSpec, on_set: Callable[[SampleSet], None]) -> Callable[[SampleSet], None]:
    """Only the samplings [eval] every_n_steps / dynamic_schedule keep (the baseline always)."""
    schedule = spec.schedule()

    def hand_over(item: SampleSet) -> None:
        if item.baseline or schedule.should_eval(item.step, item.is_final):
            on_set(item)

    return hand_over


def resumed(spec: RunSpec) -> bool:
    """kohya continued from saved weights: its e000000 images are not the base model's."""
    return bool(spec.arg("network_weights") or spec.arg("resume"))


def sample_watcher(spec: RunSpec, worker: EvalWorker, n_prompts: int, done: Iterable[str]) -> SampleWatcher:
    """`train`: kohya's samplings of this run (files already in sample/ are an earlier run's), to `worker`."""
    folder = spec.output_dir / SAMPLE_FOLDER
    before = list(folder.iterdir()) if folder.is_dir() else []
    samples = SampleFolder(spec, n_prompts, ignore=before, resumed=resumed(spec), done=done)
    return SampleWatcher(samples, scheduled(spec, worker.submit))  # type: ignore[arg-type]


def check_sample_folder(folder: Path, watch: bool) -> None:
    """eval-dir: refuse a folder without kohya's samples, before anything is written."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; give the kohya output folder to eval-dir")
    samples = folder / SAMPLE_FOLDER
    if watch or (samples.is_dir() and any(parse_sample_name(p) for p in samples.iterdir())):
        return
    raise UserError(f"{folder}: no kohya sample images in {samples}; eval.source = 'kohya_samples' scores the "
                    "images kohya saves with --sample_every_n_steps/--sample_prompts (or set eval.source = 'generate')")


def eval_dir_samples(spec: RunSpec, worker: EvalWorker, n_prompts: int, done: set[str],
                     say: Callable[[str], None]) -> tuple[int, SampleWatcher]:
    """eval-dir: queue the folder's complete samplings not in the CSV yet; returns how many (the baseline not
    counted) and the watcher that hands over later ones (started by the caller under --watch)."""
    samples = SampleFolder(spec, n_prompts, resumed=resumed(spec), done=done)
    queued: list[SampleSet] = []

    def submit(item: SampleSet) -> None:
        queued.append(item)
        worker.submit(item)  # type: ignore[arg-type]

    hand_over = scheduled(spec, submit)
    found = samples.new_sets()
    for item in found:
        hand_over(item)
    count = sum(not item.baseline for item in queued)
    say(f"{len(found)} complete samplings in {samples.folder} not in {spec.csv_path.name}; {count} to score")
    if samples.unmatched:
        say(f"warning: sample images for prompt {min(samples.unmatched) + 1}+ but the prompt file has {n_prompts} "
            "prompts; those images are not scored (is it the file kohya sampled with?)")
    return count, SampleWatcher(samples, hand_over)


# ------------------------------------------------------------------------------------------ scoring
def sample_prompts_file(spec: RunSpec) -> Path:
    """kohya's --sample_prompts (the file its images were made from), else [eval] prompts."""
    value = spec.arg("sample_prompts")
    if value:
        return Path(value)
    if spec.config.eval.prompts:
        return spec.config.eval.prompts
    raise UserError("eval.source = 'kohya_samples': no prompt file; set kohya.args.sample_prompts or [eval] prompts "
                    "to the file kohya sampled with")


def check_sample_inputs(spec: RunSpec) -> Inputs:
    """What scoring kohya's samples needs: the scoring models, the references and kohya's prompt file (no base
    model, no held-out prompts: kohya generates none)."""
    from lora_monitor.evaluation.metrics import check_model_available

    config = spec.config
    if spec.kohya is not None and not (spec.arg("sample_every_n_steps") or spec.arg("sample_every_n_epochs")):
        raise UserError("eval.source = 'kohya_samples' but kohya never samples; add sample_every_n_steps (or "
                        "sample_every_n_epochs) to [kohya.args]")
    check_model_available(config.metrics.fashion_clip_model, "fashion_clip")
    check_model_available(config.metrics.visual_model, "visual")
    return Inputs(references=reference_images(spec), prompts=load_prompts(sample_prompts_file(spec)))


def sample_plan(prompts: list[Prompt]) -> tuple[ImagePlan, list[int]]:
    """The plan of one sampling and the prompt indices it keeps: a line repeating another's text and `--d` seed
    draws the same image, which would read as no diversity, so only the first is scored. A text on several
    lines with other (or no: kohya then draws a random one) seeds measures diversity."""
    seen: set[tuple[str, int]] = set()
    keep = []
    for i, p in enumerate(prompts):
        if p.seed is not None and (p.text, p.seed) in seen:
            continue
        if p.seed is not None:
            seen.add((p.text, p.seed))
        keep.append(i)
    return ImagePlan(tuple(prompts[i] for i in keep), (MAIN,) * len(keep)), keep


@dataclass
class _Images:
    images: list
    prompts: list[str]


@dataclass
class SampleModels(Models):
    """Only the scorer: the images are kohya's."""

    keep: list[int] = field(default_factory=list)
    output_name: str | None = None

    def evaluate(self, item: object, fingerprints: dict[str, tuple[str, dict]]) -> ev.EvalResult:
        assert isinstance(item, SampleSet)
        return evaluate_samples(self, item)


def build_sample_models(spec: RunSpec, inputs: Inputs) -> SampleModels:
    quiet_libraries()
    config = spec.config
    from lora_monitor.evaluation.memorisation import CopyIndex
    from lora_monitor.evaluation.metrics import Scorer
    from lora_monitor.evaluation.references import load_image
    from lora_monitor.tracking.plan_record import write_plan_record

    scorer = Scorer(config.metrics.fashion_clip_model, config.metrics.visual_model,
                    weights=dict(config.metrics.weights), device=device_name(config), cache_dir=spec.cache_dir)
    warnings = list(scorer.set_references(inputs.references))
    plan, keep = sample_plan(inputs.prompts)
    write_plan_record(spec.output_dir, scorer.reference_paths, plan)
    return SampleModels(evaluator=None, scorer=scorer, output_dir=spec.output_dir, warnings=warnings, plan=plan,
                        copies=CopyIndex([load_image(p) for p in scorer.reference_paths]),
                        copy_threshold=config.metrics.copy_threshold, keep=keep, output_name=spec.output_name)


def evaluate_samples(models: SampleModels, item: SampleSet) -> ev.EvalResult:
    """Score one sampling; an unreadable image becomes the row's error."""
    from lora_monitor.evaluation.references import load_image

    started = time.monotonic()
    try:
        files = [item.files[i] for i in models.keep]
        images = _Images([load_image(p) for p in files], [p.text for p in models.plan.prompts])  # type: ignore[union-attr]
        metrics = judge(models, images)  # type: ignore[arg-type]
    except UserError as exc:
        return ev.EvalResult(item.path, item.step, error=f"kohya sample not readable: {exc}", baseline=item.baseline,
                             seconds=time.monotonic() - started)
    if not item.baseline and PSEUDO_NAME_RE.match(item.path.name):  # the LoRA may have been saved meanwhile
        item = named(item, models.output_dir, models.output_name)
    _keep_images(models.output_dir, item, files, list(models.plan.prompts))  # type: ignore[union-attr]
    return ev.EvalResult(item.path, item.step, metrics, seconds=time.monotonic() - started, baseline=item.baseline)


def named(item: SampleSet, output_dir: Path, output_name: str | None) -> SampleSet:
    lora = lora_at(output_dir, output_name, item.kind, item.number)
    if lora is None:
        return item
    step = item.step if item.step is not None else step_of(lora)
    return replace(item, path=lora, step=step, is_final=is_final_name(lora, output_name))


def _keep_images(output_dir: Path, item: SampleSet, files: list[Path], prompts: list[Prompt]) -> None:
    """Copy kohya's images to eval/<row's checkpoint>/ as lora-monitor's own (the report and TensorBoard)."""
    from lora_monitor.run_spec import eval_folder

    folder = eval_folder(output_dir, item.path)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, src in enumerate(files):
        names.append(f"{i:02d}.png")
        shutil.copyfile(src, folder / f".{names[-1]}.tmp")
        os.replace(folder / f".{names[-1]}.tmp", folder / names[-1])
    manifest = {"checkpoint": item.path.name, "step": item.step, "prompts": [p.text for p in prompts],
                "images": names, "seeds": [p.seed for p in prompts], "source": SOURCE,
                "samples": [str(p) for p in files], "written": time.time()}
    (folder / ".manifest.json.tmp").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(folder / ".manifest.json.tmp", folder / "manifest.json")


def settle_name(result: ev.EvalResult, output_dir: Path, output_name: str | None) -> ev.EvalResult:
    """A row still named `sample@...` when it is written: the LoRA kohya saved at its step, if there is one now
    (its images move along)."""
    m = PSEUDO_NAME_RE.match(result.checkpoint.name)
    if m is None or result.baseline:
        return result
    lora = lora_at(output_dir, output_name, m["kind"], int(m["number"]))
    if lora is None:
        return result
    from lora_monitor.run_spec import eval_folder

    old, new = eval_folder(output_dir, result.checkpoint), eval_folder(output_dir, lora)
    if old.is_dir() and not new.exists():
        os.replace(old, new)
    step = result.step if result.step is not None else step_of(lora)
    return replace(result, checkpoint=lora, step=step)
