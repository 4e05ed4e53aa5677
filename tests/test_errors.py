"""errors.py: the kinds of error, their exit codes, and the one wrapper every main() runs in.

That a UserError raised in a Ray task or a Ray Data worker reaches the driver as its own class
is tested on a cluster in test_pipeline_ray.py."""

from __future__ import annotations

import pickle
import signal

import pytest

from ensemble.errors import ConfigError, EnsembleError, RunError, StallError, UserError, run_cli, worker_error


def _failing(exc: BaseException):
    def body(*args, **kwargs):
        raise exc
    return body


def test_kinds_and_their_exit_codes():
    from ensemble import config
    from ensemble.checkpoint import CheckpointError
    from ensemble.train_stage import MemberFailed
    from ensemble.trials import SearchFailed

    assert config.ConfigError is ConfigError and issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, RunError)
    for kind in (ConfigError, StallError, RunError, CheckpointError):
        assert issubclass(kind, UserError) and kind.exit_code == 2
    for failure in (MemberFailed, SearchFailed):
        assert issubclass(failure, EnsembleError) and not issubclass(failure, UserError) and failure.exit_code == 1


@pytest.mark.parametrize("kind, code", [(ConfigError, 2), (StallError, 2), (RunError, 2), (EnsembleError, 1)])
def test_an_error_is_one_line_and_its_exit_code(kind, code, capsys):
    assert run_cli(_failing(kind("--lr -1.0: must be > 0"))) == code
    captured = capsys.readouterr()
    assert captured.err == "error: --lr -1.0: must be > 0\n" and captured.out == ""


def test_the_body_s_value_passes_through_and_other_errors_propagate():
    assert run_cli(lambda: 0) == 0
    assert run_cli(lambda: "an app", system_exit=True) == "an app"
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0)


def test_ctrl_c_is_the_interrupted_line_and_130_only_where_one_is_given(capsys):
    assert run_cli(_failing(KeyboardInterrupt()), interrupted="interrupted: nothing was written") == 130
    assert capsys.readouterr().err == "interrupted: nothing was written\n"
    with pytest.raises(KeyboardInterrupt):
        run_cli(_failing(KeyboardInterrupt()))


def test_system_exit_raises_the_code_instead_of_returning_it(capsys):
    with pytest.raises(SystemExit) as exited:
        run_cli(_failing(RunError("--run r: member 1 has not finished")), system_exit=True)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --run r: member 1 has not finished\n"


def test_the_line_is_the_message_as_raised_whatever_ray_data_appends_to_args():
    raised = StallError("image cache block 3 could not be fetched in 2 s")
    raised.args = (raised.args[0] + "\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).",)
    arrived = pickle.loads(pickle.dumps(raised))  # as it crosses from the worker
    assert type(arrived) is StallError and str(arrived) == "image cache block 3 could not be fetched in 2 s"


class _TaskError(Exception):
    """Stands in for ray.exceptions.RayTaskError: its message is the worker's traceback."""


def _as_ray_raises_it(cause: Exception) -> Exception:
    """What ``ray.get`` raises for ``cause`` (RayTaskError.as_instanceof_cause): an instance of a
    subclass of both, whose ``cause`` is the error raised in the worker."""
    dual = type(f"RayTaskError({type(cause).__name__})", (_TaskError, type(cause)), {})(
        "ray::MemberTrainer.fit() (pid=1)\nTraceback (most recent call last): ...")
    dual.cause = cause
    return dual


def test_a_worker_s_user_error_is_its_own_line_not_the_traceback(capsys):
    stall = StallError("image cache block 3 could not be fetched in 2 s")
    raised = _as_ray_raises_it(stall)
    assert isinstance(raised, StallError) and worker_error(raised) is stall
    assert run_cli(_failing(raised)) == 2
    assert capsys.readouterr().err == "error: image cache block 3 could not be fetched in 2 s\n"
    other = _as_ray_raises_it(KeyError("block 3"))
    assert worker_error(other) is other  # not the user's to fix: stays as Ray raised it


def test_stall_error_builds_a_stall(monkeypatch):
    import ray

    from ensemble.watch import stall_error

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert type(stall_error("image decoding made no progress in 600 s", "its tasks need {need} each", 1)) is StallError


def test_driver_main_a_dead_member_is_exit_1_and_ctrl_c_the_resume_line(monkeypatch, capsys, signal_handlers):
    from ensemble import driver
    from ensemble.train_stage import MemberFailed

    monkeypatch.setattr(driver, "run", _failing(MemberFailed("member 2 failed after 3 restarts")))
    assert driver.main(["--output", "o"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: member 2 failed after 3 restarts"
    monkeypatch.setattr(driver, "run", _failing(KeyboardInterrupt()))
    assert driver.main(["--output", "o", "--fresh"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interrupted: members stopped; finished members and epoch checkpoints are kept. "
        "To resume, run the same command with the same --output: python -m ensemble.driver --output o")


def test_tune_main_a_search_without_results_is_exit_1(monkeypatch, capsys):
    from ensemble import tune
    from ensemble.trials import SearchFailed

    monkeypatch.setattr(tune, "run_search", _failing(SearchFailed("no trial reported a val accuracy")))
    assert tune.main(["--output", "o"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: no trial reported a val accuracy"


def test_exit_process_ends_with_the_code_after_flushing_what_was_written(tmp_path):
    """``python -m ensemble.<command>`` ends through exit_process (os._exit, no interpreter
    teardown): the code is the process's, and a last line still buffered in a pipe, a log record
    and an atexit handler's absence show it flushed and did not run the usual exit."""
    import subprocess
    import sys

    script = ("import atexit, logging, sys\n"
              "from ensemble.errors import exit_process\n"
              "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
              "atexit.register(lambda: print('atexit ran', flush=True))\n"
              "logging.getLogger('ensemble.driver').info('logged last')\n"
              "sys.stdout.write('printed last, no newline')\n"
              "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "printed last, no newline"
    assert proc.stderr.strip() == "logged last"


def test_sigterm_is_a_clean_stop_for_every_command(tmp_path, monkeypatch):
    """kill / ray job stop on predict, export, distill or tune: the command's clean-up runs (here a
    run folder's lock is released) and it ends with its interrupted line and 130, as Ctrl-C does."""
    import subprocess
    import sys
    import textwrap

    from ensemble import distill, export, predict, tune

    out = tmp_path / "folder"
    script = textwrap.dedent(f"""
        import os, signal, time
        from ensemble.errors import run_cli, stop_on_sigterm
        from ensemble.run_lock import RunLock
        stop_on_sigterm()
        def body():
            with RunLock({str(out)!r}):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
        raise SystemExit(run_cli(body, interrupted="interrupted: stopped"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stderr.strip().splitlines()[-1] == "interrupted: stopped"
    assert not (out / "run.lock").exists()

    missing = str(tmp_path / "no-run")
    for module, argv in ((predict, ["--run", missing, "--images", missing]),
                         (export, ["--run", missing, "--output", "x.onnx"]),
                         (distill, ["--run", missing, "--output", str(tmp_path / "s")]), (tune, ["--trials", "0"])):
        monkeypatch.setattr(signal, "signal", lambda sig, handler, module=module: installed.append((module, sig)))
        installed = []
        assert module.main(argv) == 2
        assert (module, signal.SIGTERM) in installed, module.__name__
    monkeypatch.undo()
