"""Launch kohya sd-scripts' training script, turn its output into events, stop it without leaving orphans.

`KohyaProcess` is the running trainer, in its own process group. Its arguments are worked out in
`kohya/args.py`, checked before the launch in `kohya/preflight.py`; its output is kept in kohya.log by
`kohya/console_log.py`.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lora_monitor.errors import UserError
from lora_monitor.events import TrainerExited, TrainerLog
from lora_monitor.kohya.console_log import ConsoleLog
from lora_monitor.kohya.output_parser import KohyaOutputParser

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

TERM_WAIT_S = 5.0  # after SIGTERM, before SIGKILL
READER_WAIT_S = 5.0  # after kohya exits, for its pipes to drain before leftovers of its group are killed
READ_SIZE = 1 << 16
DEFAULT_COLUMNS = "160"  # rich wraps log records at the console width, 80 on a pipe unless COLUMNS says


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
