"""What a command line ends with in one ``error: ...`` line, and the one wrapper that prints it.

Raised where the misuse is seen, printed once by ``run_cli``, the wrapper every ``main()`` runs in:

    EnsembleError          exit 1: the work failed though the settings were fine
    ├── MemberFailed       (train_stage) a member died more often than Ray may restart it
    ├── StorageError       a file could not be written (a full disk, an object store failing
    │                      after its retries); also an OSError. Finished work is kept
    ├── SearchFailed       (trials) no Tune trial produced a result
    ├── ParityError        (export) an exported ONNX file that ONNX Runtime runs to other numbers
    │                      than the members in torch; nothing is kept
    └── UserError          exit 2: what the user can fix; the message names the value and the fix
        ├── ConfigError    a bad setting: a flag, a YAML key, a path, more than the cluster holds
        ├── StallError     a stage made no progress; finished work is kept, a rerun resumes
        ├── GpuMemoryError (gpu_memory) a member does not fit its share of a GPU's memory, or ran out
        │                  of it; the line names the batch size or share that fits
        └── RunError       a run folder that cannot be used as it is: unfinished, or damaged
            ├── CheckpointError  (checkpoint) a saved file changed, unreadable, or from another config
            │   └── DamagedFile  (checkpoint) missing, torn or changed: the driver trains that member again
            └── RunFolderBusy    (run_lock) another driver holds the run folder's lock

An error raised in a Ray worker reaches the driver as its own class: ``ray.get`` raises it as a
subclass of both ``ray.exceptions.RayTaskError`` and the error's class; ``worker_error`` gives
back the error itself. Ray Data keeps the class only with ``raise_original_map_exception``
(``data.quiet_ray_data`` sets it). No Ray and no torch here: every layer imports this module.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Optional, Sequence, TypeVar

T = TypeVar("T")


class EnsembleError(Exception):
    """An error a command line ends with: one ``error: <message>`` line, exit code ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        # The one line, as raised. Ray Data appends its retry hints to an error's ``args`` in the
        # worker; unpickling restores this attribute after ``args``, so the line arrives unchanged.
        self.message = message

    def __str__(self) -> str:
        return self.message


class UserError(EnsembleError):
    """What the user can fix; the message says what to change (exit code 2)."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A setting the user can fix (also importable from ``ensemble.config``)."""


class StorageError(EnsembleError, OSError):
    """A file that could not be written: what, where, and the system's reason (``storage``
    raises it for every failed write; it is an OSError too, for callers that catch those).
    What was committed before stays committed, so rerunning the same command resumes."""


class StallError(UserError):
    """A stage that made no progress for ``--stall-timeout`` (what it needs, what is free);
    finished members and epochs are kept, and rerunning the same command resumes."""


class RunError(UserError):
    """A run folder that cannot be used as it is: a member that has not finished, or a damaged
    file (``checkpoint.CheckpointError``)."""


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced: ``https://u:t@host/x`` ->
    ``https://***@host/x``. For what is written to a file, a log line or a tracking parameter
    (``--mlflow-uri``, an ``s3://KEY:SECRET@bucket`` path, the command line in run.lock)."""
    return _USERINFO.sub("***@", text) if "://" in text else text


def worker_error(exc: BaseException) -> BaseException:
    """The EnsembleError a Ray worker raised, when ``exc`` carries one; else ``exc`` as it is.

    ``ray.get`` raises a task's error as ``RayTaskError.as_instanceof_cause()``: an instance of a
    subclass of RayTaskError and of the error's own class, whose message is the worker's
    traceback and whose ``cause`` is the error itself. Its one line is the cause's message. Any
    other error stays as Ray raised it: its traceback is what it needs."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(exc, EnsembleError) and isinstance(cause, EnsembleError) else exc


def run_cli(body: Callable[[], T], *, interrupted: Optional[str] = None, system_exit: bool = False):
    """``body()`` as a command line runs it: its value, or an EnsembleError as one ``error:`` line
    on stderr and the error's exit code. With ``interrupted``, Ctrl-C (KeyboardInterrupt) is that
    line and 130; without, it propagates. The code is returned (for ``main()``), or raised as
    SystemExit with ``system_exit`` (for a caller whose value is not an exit code, like a Serve
    application builder)."""
    try:
        return body()
    except EnsembleError as exc:
        print(f"error: {worker_error(exc)}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        code = 130
    if system_exit:
        raise SystemExit(code)
    return code


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, but an ``examples:`` epilog keeps its lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line + "\n" for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class CommandParser(argparse.ArgumentParser):
    """Every command's argument parser. A bad flag or value raises ConfigError, which ``run_cli``
    prints as the one ``error: ...`` line with exit 2 (argparse would print its usage block first),
    so each ``main()`` parses inside ``run_cli``. ``examples``: command lines that end ``--help``."""

    def __init__(self, *, examples: Sequence[str] = (), **kwargs):
        if examples:
            kwargs["epilog"] = "examples:\n" + "\n".join(f"  {line}" for line in examples)
        super().__init__(formatter_class=_HelpFormatter, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message} (the flags: {self.prog} --help)")


def parse_command(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    """``parser.parse_args(argv)``, or the exit code once a bad flag's one line is printed (an int):
    ``args = parse_command(...)``, then ``if isinstance(args, int): return args``."""
    return run_cli(lambda: parser.parse_args(argv))


def stop_on_sigterm() -> None:
    """SIGTERM (``kill``, ``ray job stop``, a scheduler ending a job) ends the command as Ctrl-C
    does: a KeyboardInterrupt that ``run_cli`` turns into its ``interrupted`` line, after the
    command's own clean-up ran (its run folder's lock released, an MLflow run marked KILLED, a
    temporary folder removed). For ``main()`` only, in the main thread."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def exit_process(code: int) -> None:
    """End a command-line process (``python -m ensemble.<command>``) with ``code``, now: Ray
    disconnected (the local cluster it started stopped, so no process is left behind), output and
    logs flushed, then ``os._exit``. After the last line, the interpreter's own teardown of Ray's
    and torch's native libraries took about 2 s more on a 2-core machine; every file of the run
    is written and closed by then. Not for library callers: ``main()`` returns the code."""
    import logging
    import os

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
