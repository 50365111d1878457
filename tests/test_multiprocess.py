"""APT under DistributedDataParallel: two CPU processes (gloo) launched by ``torch.distributed.run`` and by
``accelerate launch --multi_gpu`` run tests/mp_script.py through all four pruning events (USERS.md item 3).

Checked after every event: both ranks hold bitwise identical masks, kept-index records, ranks, parameter shapes and
values and salience EMAs (salience is averaged over processes); the DDP wrapper is the same object and covers
exactly the module's current parameters (it was rebuilt in place); the gradients of the first step on the new
structure are identical on both ranks (synchronized, new parameters included). At the end: finite weights, the
target density within 1 %, and rank 0's export reloads with the trained model's logits. Unsupported setups
(stock Trainer under DDP, FSDP, DeepSpeed, DataParallel) raise clear errors at train start.

``accelerate launch --cpu --num_processes 2`` is not used: accelerate's simple launcher then runs one Python process
(several CPU processes go through ``mpirun`` with ``--mpirun_hostfile``; there is no MPI here) and accelerate 1.15
fails in ``PartialState`` before training. ``accelerate launch --multi_gpu`` launches through torch.distributed.run
and works on a CPU-only machine with ``TrainingArguments(use_cpu=True)``.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import apt_hf
from apt_hf import distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mp_script.py"
EVENTS = (13, 22, 31, 40)
SAME = ("masks", "ranks", "shapes", "params", "salience", "density", "ddp_type", "ddp_covers_params")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _launch(launcher: str, out: Path, *script_args: str, expect_ok: bool = True) -> str:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # accelerate's own launcher (torch.distributed.run underneath); gloo on CPU via use_cpu=True
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port())]
    proc = subprocess.run([*cmd, str(SCRIPT), str(out), *script_args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=170)
    log = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, log[-6000:]
    return log


def _same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"ranks differ at {where}"
    else:
        assert a == b, f"ranks differ at {where}: {a!r} vs {b!r}"


def _load(out: Path, rank: int, name: str) -> dict:
    return torch.load(out / f"rank{rank}" / name, weights_only=False)


def _base_numel(shapes: dict) -> int:
    return sum(math.prod(s) for n, s in shapes.items() if "apt_" not in n)


def _check_run(out: Path) -> None:
    finals = [_load(out, r, "final.pt") for r in (0, 1)]
    prev = None
    for e in EVENTS:
        recs = [_load(out, r, f"event{e}.pt") for r in (0, 1)]
        for key in SAME:
            _same(recs[0][key], recs[1][key], f"event {e}: {key}")
        for rec, final in zip(recs, finals):
            assert rec["ddp_type"] == "DistributedDataParallel" and rec["ddp_covers_params"], e
            assert rec["ddp_ignored"] and all("apt_transform" in n for n in rec["ddp_ignored"])
            assert rec["ddp_id"] == final["ddp_id"]  # rebuilt in place: the Trainer's references stay valid
            assert all(bool(((m == 0) | (m == 1)).all()) for k, m in rec["masks"].items() if "kept" not in k)
        if prev is not None:
            assert _base_numel(recs[0]["shapes"]) < _base_numel(prev["shapes"]), f"nothing shrank at event {e}"
            assert any(r > prev["ranks"][n] for n, r in recs[0]["ranks"].items()), f"no adapter grew at event {e}"
        prev = recs[0]
        # first optimizer step on the new structure: gradients (new parameters included) synchronized
        grads = [_load(out, r, f"grads{e + 1}.pt") for r in (0, 1)]
        assert grads[0] and set(grads[0]) <= set(recs[0]["params"])
        assert any(".apt_A." in n for n in grads[0]) and any(".apt_B." in n for n in grads[0])
        for n in grads[0]:
            assert grads[0][n].shape == recs[0]["params"][n].shape, n
        _same(grads[0], grads[1], f"gradients after event {e}")
    for key in SAME + ("state_dict",):
        _same(finals[0][key], finals[1][key], f"final {key}")
    for final in finals:
        assert final["world_size"] == 2 and final["global_step"] == 45 and final["events_done"] == len(EVENTS)
        assert final["finite"] and final["losses"] and all(math.isfinite(x) for x in final["losses"])
        assert 0.99 * final["target"] <= final["density"] <= final["target"] + 1e-12, final["density"]
    # rank 0 exported the pruned model; it reloads and answers like the trained model
    reloaded = apt_hf.load_pruned(out / "export")
    with torch.no_grad():
        got = reloaded(**finals[0]["inputs"]).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, finals[0]["logits"], atol=1e-4, rtol=1e-4)
    n_export = sum(p.numel() for p in reloaded.parameters())
    n_trained = sum(math.prod(s) for n, s in finals[0]["shapes"].items() if "apt_" not in n)
    assert n_export <= n_trained


# ================================================================================================ multi-process
@pytest.mark.slow
def test_torchrun_bert_ddp(tmp_path):
    _launch("torchrun", tmp_path / "run")
    _check_run(tmp_path / "run")


@pytest.mark.slow
def test_torchrun_llama_gqa_ddp_kurtosis_no_unused(tmp_path):
    # kurtosis term reduced too; find_unused_parameters=False shows no DDP parameter is left out of the graph
    _launch("torchrun", tmp_path / "run", "--kind", "gqa", "--sparsity", "0.8", "--kurtosis", "--no-find-unused")
    _check_run(tmp_path / "run")


@pytest.mark.slow
def test_accelerate_launch_bert_ddp_grad_accumulation(tmp_path):
    _launch("accelerate", tmp_path / "run", "--grad-accum", "2")  # no_sync micro-batches on the rebuilt wrapper
    _check_run(tmp_path / "run")


@pytest.mark.slow
def test_stock_trainer_under_ddp_is_refused(tmp_path):
    log = _launch("torchrun", tmp_path / "run", "--stock-trainer", expect_ok=False)
    assert "UnsupportedParallelismError" in log and "Use apt_hf.APTTrainer" in log, log[-4000:]
    assert not (tmp_path / "run" / "rank0" / "event13.pt").exists()


# ================================================================================================ single process
def _args(**kw) -> SimpleNamespace:
    base = dict(deepspeed=None, deepspeed_plugin=None, fsdp_plugin_args=None, parallelism_config=None, n_gpu=1)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw, name", [
    (dict(fsdp_plugin_args={"fsdp_version": 2}), "FSDP"),
    (dict(deepspeed="ds_config.json"), "DeepSpeed"),
    (dict(n_gpu=2), "DataParallel"),
    (dict(parallelism_config=object()), "parallelism_config"),
])
def test_unsupported_setups_raise_naming_what_is_supported(kw, name):
    with pytest.raises(distributed.UnsupportedParallelismError, match=name) as err:
        distributed.check_supported(_args(**kw), None, has_rebuilder=True)
    assert "DistributedDataParallel" in str(err.value) and "APTTrainer" in str(err.value)


def test_accelerate_env_fsdp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(distributed.UnsupportedParallelismError, match="FSDP"):
        distributed.check_supported(_args(), None, has_rebuilder=False)


def test_single_process_helpers_are_identity():
    assert distributed.world_size() == 1
    t = torch.arange(3.0)
    assert distributed.mean_over_ranks([t, None], [3, 2])[0] is t
    assert distributed.mean_dict_over_ranks({"a": 1.5}, ["a", "b"]) == {"a": 1.5}
    distributed.broadcast_([t])
    assert torch.equal(t, torch.arange(3.0))
    distributed.check_supported(_args(), None, has_rebuilder=False)  # one process: stock Trainer is fine
