"""What the tests of the example and benchmark scripts share: loading a script as a module, running it as a command
(plain or under ``accelerate launch``, one torch thread) and checking that bad input is refused before any model is
built."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]


def loaded_script(path: Path, name: str) -> Iterator[ModuleType]:
    """For a module-scoped fixture (``yield from``): the script at ``path`` as module ``name``, registered in
    ``sys.modules`` while it runs (dataclasses look their module up) and removed afterwards."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def script_env() -> dict[str, str]:
    """The environment of a script run in a child process: offline, this checkout's ``src`` first, one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def run_script(script: Path, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from the repository root."""
    return subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=timeout)


def accelerate_launch(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` (one process, CPU) of an example script, as the README runs it."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)


def explain(proc: subprocess.CompletedProcess) -> str:
    """A failed run's exit code and the tails of its output, for an assertion message."""
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"


def fail_before_training(script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                         args: list[str]) -> str:
    """Run ``script.main(args)``: it must exit with code 2 and one line ``<script>.py: error: ...`` on stderr (the
    returned message), and never load a model of the ``AutoModelFor*`` classes it imports."""

    def no_model(*_, **__):
        raise AssertionError("a model was loaded although the inputs are invalid")

    model_classes = [getattr(script, name) for name in dir(script) if name.startswith("AutoModelFor")]
    assert model_classes, f"{script.__file__} imports no AutoModelFor* class to guard"
    for cls in model_classes:
        monkeypatch.setattr(cls, "from_pretrained", no_model)
    capsys.readouterr()  # drop what setting up the test printed
    with pytest.raises(SystemExit) as exc:
        script.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"{Path(script.__file__).name}: error: "), err
    assert "Traceback" not in err
    return err
