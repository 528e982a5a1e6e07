"""Launch kohya sd-scripts' training script, turn its output into events, stop it without leaving orphans.

- `effective_args`: the arguments kohya will train with ([kohya.args] over kohya's own `config_file`).
- `build_argv`: the argv list (never a shell string).
- `preflight`: the mistakes worth catching before minutes of model loading.
- `KohyaProcess`: the running trainer, in its own process group.

Relative paths inside kohya's own config files are relative to kohya's working directory, which the
launcher sets to `kohya.sd_scripts` (see `kohya_cwd`).
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lora_monitor.errors import UserError
from lora_monitor.events import TrainerExited, TrainerLog
from lora_monitor.kohya.output_parser import KohyaOutputParser

if TYPE_CHECKING:
    from lora_monitor.config import KohyaConfig

log = logging.getLogger(__name__)

TERM_WAIT_S = 5.0  # after SIGTERM, before SIGKILL
READER_WAIT_S = 5.0  # after kohya exits, for its pipes to drain before leftovers of its group are killed
READ_SIZE = 1 << 16
DEFAULT_COLUMNS = "160"  # rich wraps log records at the console width, 80 on a pipe unless COLUMNS says
HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ARG_KEY_RE = re.compile(r"[A-Za-z_][\w-]*")
CONSOLE_LOG_NAME = "kohya.log"  # in kohya's output_dir: everything kohya printed, as it came


def kohya_cwd(kohya: KohyaConfig) -> Path:
    """The working directory kohya runs in (relative paths in its config files are relative to it)."""
    return Path(kohya.sd_scripts)


def script_path(kohya: KohyaConfig) -> Path:
    name = kohya.script or ("sdxl_train_network.py" if kohya.sdxl else "train_network.py")
    return Path(name) if Path(name).is_absolute() else Path(kohya.sd_scripts) / name


# -- arguments -----------------------------------------------------------------------------------------


def _resolve(value: str, base: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def read_kohya_config_file(path: Path) -> dict[str, Any]:
    """kohya's `--config_file` as kohya reads it (train_util.read_config_from_file): `.toml` appended when
    missing; top-level tables flattened into one namespace, top-level plain values kept as they are."""
    if not path.name.endswith(".toml"):
        path = path.with_name(path.name + ".toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"kohya config_file {path} not found; fix kohya.args.config_file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"kohya config_file {path} cannot be read ({exc}); check the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"kohya config_file {path}: not valid TOML ({exc}); fix the syntax there") from None
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    return flat


def effective_args(kohya: KohyaConfig) -> dict[str, Any]:
    """The arguments kohya trains with: [kohya.args] over the values of kohya's own `config_file`.

    kohya parses the command line into a namespace pre-filled from `config_file`, so a given option wins
    over the file. `false`, empty lists and None are never put on the command line (see `build_argv`), so
    they cannot switch off what the file sets: the file's value stays.
    """
    cli = dict(kohya.args)
    merged: dict[str, Any] = {}
    if cli.get("config_file"):
        merged.update(read_kohya_config_file(_resolve(str(cli["config_file"]), kohya_cwd(kohya))))
    for key, value in cli.items():
        if _on_command_line(value):
            merged[key] = value
        else:
            merged.setdefault(key, value)
    return merged


def _on_command_line(value: object) -> bool:
    return value is not None and value is not False and value != [] and value != ()


def read_dataset_config(path: Path) -> dict[str, Any]:
    """kohya's `--dataset_config` (.toml or .json, config_util.load_user_config)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"kohya dataset_config {path} not found; fix kohya.args.dataset_config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"kohya dataset_config {path} cannot be read ({exc}); check the file") from None
    try:
        if path.name.lower().endswith(".json"):
            return json.loads(text)
        return tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"kohya dataset_config {path}: cannot be parsed ({exc}); fix the syntax") from None


def train_data_dirs(kohya: KohyaConfig) -> list[Path]:
    """The folders of training images kohya will use (regularisation images excluded), as kohya finds them.

    With `dataset_config`: every subset's `image_dir` unless `is_reg`. Otherwise with `train_data_dir`:
    the DreamBooth sub-folders named `<repeats>_<name>` (repeats >= 1), or the folder itself with `in_json`.
    """
    args, base = effective_args(kohya), kohya_cwd(kohya)
    dirs: list[Path] = []
    if args.get("dataset_config"):
        config = read_dataset_config(_resolve(str(args["dataset_config"]), base))
        for dataset in config.get("datasets", []):
            for subset in dataset.get("subsets", []):
                if subset.get("image_dir") and not subset.get("is_reg", False):
                    dirs.append(_resolve(str(subset["image_dir"]), base))
    elif args.get("train_data_dir"):
        root = _resolve(str(args["train_data_dir"]), base)
        if args.get("in_json"):
            dirs.append(root)
        elif root.is_dir():
            dirs.extend(sorted(p for p in root.iterdir() if p.is_dir() and _dreambooth_repeats(p.name) >= 1))
    return list(dict.fromkeys(dirs))


def _dreambooth_repeats(name: str) -> int:
    try:
        return int(name.split("_")[0])
    except ValueError:
        return 0


def format_args(args: Mapping[str, Any], where: str) -> list[str]:
    """`--key value` per item; True -> bare `--key`; False/None/[] -> omitted; lists -> `--key v1 v2`."""
    out: list[str] = []
    for key, value in args.items():
        if not ARG_KEY_RE.fullmatch(key):
            raise UserError(f"{where}.{key}: not an option name; write it as kohya does, e.g. output_dir")
        if not _on_command_line(value):
            continue
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, list | tuple):
            out += [f"--{key}", *(_scalar(v, f"{where}.{key}") for v in value)]
        else:
            out += [f"--{key}", _scalar(value, f"{where}.{key}")]
    return out


def _scalar(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Path):
        raise UserError(f"{where} = {value!r}: use a string, a number, true/false or a list of those")
    return repr(value) if isinstance(value, float) else str(value)


def build_argv(kohya: KohyaConfig) -> list[str]:
    """[python, -u, script, args...] or [accelerate, launch, accelerate args..., script, args...]."""
    python = kohya.python or sys.executable
    tail = [str(script_path(kohya)), *format_args(kohya.args, "kohya.args")]
    if kohya.launcher == "python":
        return [python, "-u", *tail]
    if kohya.launcher == "accelerate":
        return [*_accelerate(python), "launch", *format_args(kohya.accelerate, "kohya.accelerate"), *tail]
    raise UserError(f"kohya.launcher = {kohya.launcher!r}: use 'python' or 'accelerate'")


def _accelerate(python: str) -> list[str]:
    """The `accelerate` command of the Python that runs kohya (its venv's), else the one on PATH."""
    sibling = Path(python).parent / "accelerate"  # not resolved: a venv's python is a symlink
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    found = shutil.which("accelerate")
    if found:
        return [found]
    return [python, "-m", "accelerate.commands.accelerate_cli"]


# -- preflight -----------------------------------------------------------------------------------------


def preflight(kohya: KohyaConfig) -> list[str]:
    """Check what would otherwise fail after minutes of model loading; returns warnings, raises UserError."""
    sd_scripts = Path(kohya.sd_scripts)
    if not sd_scripts.is_dir():
        raise UserError(f"kohya.sd_scripts = {sd_scripts}: not a folder; point it at your sd-scripts copy")
    script = script_path(kohya)
    if not script.is_file():
        raise UserError(f"kohya script {script} not found; check kohya.sd_scripts and kohya.script")
    if kohya.python and not Path(kohya.python).is_file():
        raise UserError(f"kohya.python = {kohya.python}: not found; give the Python with kohya's packages")
    args = effective_args(kohya)
    base = kohya_cwd(kohya)
    _check_output_dir(args.get("output_dir"), base)
    _check_base_model(args.get("pretrained_model_name_or_path"), base)
    save_as = args.get("save_model_as", "safetensors")
    if save_as != "safetensors":
        raise UserError(f"kohya save_model_as = {save_as!r}: only safetensors files can be evaluated (other "
                        "formats need unpickling); set kohya.args.save_model_as = \"safetensors\"")
    if args.get("dataset_config"):
        read_dataset_config(_resolve(str(args["dataset_config"]), base))
    warnings = []
    if not args.get("save_every_n_steps") and not args.get("save_every_n_epochs"):
        warnings.append("kohya saves only the final LoRA (no save_every_n_steps / save_every_n_epochs): "
                        "nothing to evaluate until training ends")
    return warnings + _unoverridable(kohya)


def _unoverridable(kohya: KohyaConfig) -> list[str]:
    """Warnings for [kohya.args] values that stay off the command line, so kohya's config_file wins."""
    if not kohya.args.get("config_file"):
        return []
    file_values = read_kohya_config_file(_resolve(str(kohya.args["config_file"]), kohya_cwd(kohya)))
    return [
        f"kohya.args.{key} = {value!r} cannot override {file_values[key]!r} from kohya's config_file (only "
        "options on the command line do); change it in that file"
        for key, value in kohya.args.items()
        if not _on_command_line(value) and _on_command_line(file_values.get(key))
    ]


def _check_output_dir(value: object, base: Path) -> None:
    if not value:
        raise UserError("kohya output_dir is not set; add output_dir to [kohya.args]")
    path = _resolve(str(value), base)
    if path.exists() and not path.is_dir():
        raise UserError(f"kohya output_dir {path} is a file; point output_dir at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"kohya output_dir {path} cannot be created ({exc.strerror}); choose another "
                        "folder") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"kohya output_dir {path} is not writable ({exc.strerror}); fix its permissions or "
                        "choose another folder") from None


def looks_local(model: str, base: Path) -> bool:
    """True for a local model path (existing, absolute, relative, or a checkpoint file name); False for a hub
    id such as `runwayml/stable-diffusion-v1-5`."""
    if _resolve(model, base).exists() or model.lower().endswith(MODEL_FILE_SUFFIXES):
        return True
    return HUB_ID_RE.fullmatch(model) is None


def _check_base_model(value: object, base: Path) -> None:
    if not value:
        raise UserError("kohya pretrained_model_name_or_path is not set; add it to [kohya.args]")
    model = str(value)
    if looks_local(model, base) and not _resolve(model, base).exists():
        raise UserError(f"kohya pretrained_model_name_or_path {model}: not found; give an existing file or "
                        "folder (write paths in full: ~ is not expanded), or a hub id like owner/name")


# -- the process ---------------------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _restore_sigint() -> None:
    """In the child before exec: an ignored SIGINT would be inherited, and kohya could not be interrupted.

    Also (Linux) ask for SIGTERM when the monitor dies without cleaning up (kill -9): kohya's stdout and
    stderr are our pipes, so it would die at its next print anyway; this way no orphan is left running.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def exit_code(returncode: int) -> int:
    """Popen's return code as a shell reports it: 128 + N when killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class ConsoleLog:
    """kohya's output kept as it came (bytes, tqdm's carriage returns included) in one file, appended per launch.

    The reader threads write each chunk as soon as they read it, unbuffered, so what kohya printed is on disk
    even when the monitor is killed (-9). stdout and stderr chunks interleave in the order they were read, as
    a terminal would show them. A failed write stops the log (once) and never stops training.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self.error: str | None = None

    @classmethod
    def open(cls, path: Path, argv: list[str], cwd: Path) -> ConsoleLog:
        """Open for appending and write the launch's header line; raises OSError and then leaves no file
        behind that it created."""
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        header = f"==== {_now()} lora-monitor started kohya in {cwd}: {shlex.join(argv)}\n"
        try:
            os.write(fd, header.encode("utf-8", errors="replace"))
        except OSError:
            os.close(fd)
            if not existed:
                path.unlink(missing_ok=True)
            raise
        return cls(path, fd)

    def write(self, data: bytes) -> str | None:
        """Append `data`; returns the reason the first time writing fails (the log is closed then)."""
        with self._lock:  # one writer at a time, and none after close()
            if self._fd is None or not data:
                return None
            try:
                while data:
                    data = data[os.write(self._fd, data):]
                return None
            except OSError as exc:
                self._close()
                self.error = f"cannot write {self.path} ({exc.strerror or exc}); kohya's output is no longer kept"
                return self.error

    def close(self, footer: str | None = None) -> None:
        if footer:
            self.write(f"==== {_now()} {footer}\n".encode())
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


class KohyaProcess:
    """kohya running in its own process group; its stdout and stderr parsed by one `KohyaOutputParser`.

    `on_event` receives every parsed event, then a final `TrainerExited`; it is called from reader threads
    (one at a time, in parse order) and must return quickly (e.g. `queue.put`): while it runs, kohya's
    output is not read. `env` holds extra environment variables over this process's environment.
    With `log_path`, everything kohya prints is also appended to that file (see `ConsoleLog`); when it cannot
    be opened or written, one warning `TrainerLog` with stream "monitor" says so and training goes on.
    Return codes are as a shell reports them: 130 after SIGINT's KeyboardInterrupt, 137 after SIGKILL.
    """

    def __init__(self, argv: Iterable[str], cwd: Path | str, on_event: Callable[[object], None],
                 env: Mapping[str, str] | None = None, log_path: Path | None = None) -> None:
        self.argv = list(argv)
        self.cwd = Path(cwd)
        self._on_event = on_event
        self.env = dict(env or {})  # over this process's environment
        self._parser = KohyaOutputParser()
        self._lock = threading.Lock()  # serialises the parser and on_event
        self._proc: subprocess.Popen[bytes] | None = None
        self._readers: list[threading.Thread] = []
        self._exited = threading.Event()  # kohya itself was reaped
        self._done = threading.Event()  # ... and TrainerExited was delivered
        self._group_gone = False
        self._log_path = log_path
        self.console_log: ConsoleLog | None = None

    @property
    def parser(self) -> KohyaOutputParser:
        return self._parser

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """None while kohya runs."""
        code = self._proc.returncode if self._proc and self._exited.is_set() else None
        return None if code is None else exit_code(code)

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("KohyaProcess.start() called twice")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env.setdefault("COLUMNS", DEFAULT_COLUMNS)
        self._open_log()
        try:
            self._proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_restore_sigint,
            )
        except OSError as exc:
            if self.console_log is not None:
                self.console_log.close(f"kohya could not be started: {exc.strerror or exc}")
            raise UserError(f"cannot start kohya ({self.argv[0]}): {exc.strerror or exc}; check kohya.python "
                            "and kohya.sd_scripts") from None
        assert self._proc.stdout is not None and self._proc.stderr is not None
        for pipe, stream in ((self._proc.stdout, "stdout"), (self._proc.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(pipe, stream), name=f"kohya-{stream}",
                                      daemon=True)
            reader.start()
            self._readers.append(reader)
        threading.Thread(target=self._wait_exit, name="kohya-wait", daemon=True).start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until kohya exited and its TrainerExited was delivered; None on timeout."""
        if self._proc is None:
            raise RuntimeError("KohyaProcess.wait() before start()")
        return self.returncode if self._done.wait(timeout) else None

    def stop(self, grace_s: float) -> int:
        """SIGINT to the group; after `grace_s` SIGTERM; after TERM_WAIT_S SIGKILL. Returns the exit code.

        kohya installs no signal handlers: SIGINT raises KeyboardInterrupt, SIGTERM ends it at once, and
        neither saves a checkpoint. Whatever is left of the group afterwards is killed.
        """
        if self._proc is None:
            raise RuntimeError("KohyaProcess.stop() before start()")
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, TERM_WAIT_S), (signal.SIGKILL, None)):
            if self._exited.is_set():
                break
            log.info("sending %s to kohya's process group %d", sig.name, self._proc.pid)
            self._signal_group(sig)
            self._exited.wait(wait_s)
        self._done.wait()
        code = self.returncode
        assert code is not None
        return code

    def _open_log(self) -> None:
        if self._log_path is None:
            return
        try:
            self.console_log = ConsoleLog.open(self._log_path, self.argv, self.cwd)
        except OSError as exc:
            self._warn(f"cannot keep kohya's output in {self._log_path} ({exc.strerror or exc}); training goes "
                       "on without that log")

    def _warn(self, text: str) -> None:
        with self._lock:
            self._emit(TrainerLog(text, "warning", "monitor"))

    # -- threads ----------------------------------------------------------------------------------------

    def _read(self, pipe: IO[bytes], stream: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while chunk := pipe.read1(READ_SIZE):  # type: ignore[attr-defined]
                if self.console_log is not None and (problem := self.console_log.write(chunk)):
                    self._warn(problem)
                self._deliver(decoder.decode(chunk), stream)
        except (OSError, ValueError):  # the pipe was closed under us (the group was killed)
            pass
        self._deliver(decoder.decode(b"", final=True), stream)

    def _deliver(self, text: str, stream: str) -> None:
        if text:
            with self._lock:
                for event in self._parser.feed(text, stream):
                    self._emit(event)

    def _emit(self, event: object) -> None:
        try:
            self._on_event(event)
        except Exception:  # a consumer's bug must not stop reading, or kohya would block on a full pipe
            log.exception("event handler failed on %r", event)

    def _wait_exit(self) -> None:
        assert self._proc is not None
        self._proc.wait()
        self._exited.set()
        for reader in self._readers:
            reader.join(READER_WAIT_S)
        # Anything left in the group has lost its parent (and may hold our pipes open): end it.
        self._signal_group(signal.SIGKILL)
        for reader in self._readers:
            reader.join()
        for pipe in (self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                pipe.close()
        with self._lock:
            for event in self._parser.flush():
                self._emit(event)
            code = exit_code(self._proc.returncode)
            if self.console_log is not None:
                self.console_log.close(f"kohya exited with code {code}")
            self._emit(TrainerExited(code, tuple(self._parser.last_lines)))
        self._done.set()

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal kohya's process group (its pgid is kohya's pid: start_new_session)."""
        if self._proc is None or self._group_gone:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            # Once empty, never signal this id again: it could be reused by an unrelated group.
            self._group_gone = self._exited.is_set()
        except PermissionError:
            log.warning("not allowed to signal kohya's process group %d", self._proc.pid)
