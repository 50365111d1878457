"""Multi-process (DistributedDataParallel) training for APT: what is supported, how salience is reduced, and how the
DDP wrapper follows physical pruning (USERS.md item 3).

Supported setups
    * one process (CPU, one GPU): ``Trainer`` + :class:`~apt_hf.APTCallback`, or :class:`~apt_hf.APTTrainer`;
    * ``DistributedDataParallel`` with :class:`~apt_hf.APTTrainer`, started by ``torchrun`` /
      ``python -m torch.distributed.run`` or ``accelerate launch --multi_gpu`` (any process-group backend: gloo on
      CPU, NCCL on GPU; accelerate's ``MULTI_CPU`` / ``MULTI_GPU`` / other ``MULTI_<device>`` DDP types). On a
      CPU-only machine use ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``
      with ``TrainingArguments(use_cpu=True)`` (gloo). ``accelerate launch --cpu --num_processes N`` runs a single
      Python process (several CPU processes need ``--mpirun_hostfile`` and an MPI install); with accelerate 1.15
      and no MPI it fails in ``PartialState`` before training starts, independent of APT.
    Tested: 2 CPU processes with gloo (tests/test_multiprocess.py); NCCL follows the same code paths (collectives
    run on the current accelerator device) but is not exercised by the test suite.

Not supported (``APTCallback`` raises at train start, naming the setup): FSDP (v1 and v2), DeepSpeed (every ZeRO
stage), Megatron-LM, XLA/TPU, tensor / context / sequence parallelism (``parallelism_config``, ``tp_plan``
DTensor models), and ``torch.nn.DataParallel`` (several GPUs driven by one process). All of these shard or
replicate parameters outside the module tree that APT edits in place. A stock ``Trainer`` with ``APTCallback``
under DDP is refused too: callbacks cannot reach the DDP wrapper, which must be rebuilt after every shrink.

Reduction across processes (all collectives run at the same optimizer steps on every rank)
    * block salience: the per-step ``sum|act| * sum|grad|`` products of every head / neuron / hidden dimension
      are all-reduced with a **mean** over processes at every optimizer step, before they enter the EMA (the
      kurtosis term's mean activations likewise). Each process's local batch then counts like one more
      gradient-accumulation micro-batch: DDP with W processes and G accumulation steps scores exactly as one process
      with W x G accumulation steps (the Trainer divides each micro-batch's loss by G, DDP averages over W). A
      non-finite score on any rank makes the mean non-finite on every rank, so all skip that step together.
    * adapter importance: **mean** over processes before rank growth (DDP already averaged the gradients it is
      computed from, so the ranks agree; the reduction makes that a guarantee).
    * the search is deterministic (stable sorts, fixed tie-breaking), so identical inputs give identical masks; as
      a safeguard the masks are also broadcast from rank 0 after every move, and the randomly initialised rows of
      grown adapters are broadcast from rank 0, so every process holds identical masks, kept-index records, ranks,
      shapes and values at every step.

Rebuilding the DDP wrapper after a physical change
    ``Trainer`` keeps the wrapper in three places: ``self.model_wrapped``, ``accelerator._models`` and, out of
    reach, the local ``model`` variable of ``_inner_training_loop`` that every ``_run_epoch`` receives and uses for
    ``accelerator.no_sync(model)``, ``training_step(model, ...)``, gradient clipping, ``model.zero_grad()`` and
    ``_maybe_log_save_evaluate``. A *new* wrapper object could only reach that local variable through a fork of the
    training loop (or by swapping it inside every ``training_step`` while the stale object keeps the old,
    full-size parameters alive until ``train()`` returns). Instead :func:`rewrap_ddp` re-runs
    ``DistributedDataParallel.__init__`` on the *same* wrapper object, with the same settings
    (``find_unused_parameters``, ``broadcast_buffers``, bucket size, ``static_graph``, ``gradient_as_bucket_view``,
    process group, device ids) and accelerate's communication hook. That builds a new reducer over the module's
    current parameters (the old reducer and its references to replaced tensors are released), checks that every
    rank has the same parameter shapes and broadcasts parameters and buffers from rank 0. Every reference the
    Trainer holds stays valid, no Trainer code is forked, and the optimizer (edited in place by
    :mod:`apt_hf.optim`) is untouched. :class:`~apt_hf.APTTrainer` installs this as the callback's
    ``rebuild_wrapper``; the callback calls it at ``on_step_end`` of each event that changed a parameter, after
    the backward pass has finished and before the next forward.

Parameters outside DDP's reach: the distillation transform ``Tr`` is applied to the hidden states the wrapped
forward returns, i.e. outside DDP's forward, and only while distilling; DDP's reducer cannot track such a
parameter ("marked ready twice"). APTTrainer therefore lists it in the module's
``_ddp_params_and_buffers_to_ignore`` before the wrapper is built, broadcasts its initial values from rank 0 and
averages its gradients itself after the backward pass of every synchronizing micro-batch (before gradient
clipping). Modules removed whole (an attention with no head left) leave the module tree, so their adapters stop
being DDP parameters; zero-width projections still take part in the graph. So every parameter DDP manages is used
in every forward, and ``ddp_find_unused_parameters`` may be left at transformers' default (True for PEFT models)
or set to False.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

SUPPORTED = ("a single process (CPU or one GPU), or DistributedDataParallel (torchrun / accelerate launch "
             "--multi_gpu; gloo or NCCL) with apt_hf.APTTrainer")


class UnsupportedParallelismError(RuntimeError):
    """Raised at train start for FSDP, DeepSpeed and other setups APT cannot follow."""


# ---------------------------------------------------------------------------------------------- basics
def world_size() -> int:
    """Number of processes in the default group (1 without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _comm_device() -> torch.device:
    """Device whose tensors the default group's backend reduces (CPU for gloo/mpi, the current accelerator else)."""
    backend = str(dist.get_backend())
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    accel = getattr(torch, "accelerator", None)
    if accel is not None and accel.is_available():
        current = accel.current_accelerator()
        return torch.device(current.type, accel.current_device_index())
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(tensors: Sequence[Optional[torch.Tensor]], sizes: Sequence[int]) -> list[Optional[torch.Tensor]]:
    """Element-wise mean over processes of each slot, with one collective for all slots.

    ``sizes[i]`` is the length every rank expects for slot ``i``; a rank whose slot is ``None`` (or of another
    length) contributes nothing to it, and a slot no rank holds comes back ``None``. Results are float32 on the
    CPU and bitwise identical on every rank. In one process the inputs come back unchanged.
    """
    if world_size() == 1:
        return list(tensors)
    device = _comm_device()
    n = len(sizes)
    flat = torch.zeros(sum(sizes) + n, dtype=torch.float32, device=device)
    offset = 0
    for i, (t, size) in enumerate(zip(tensors, sizes)):
        if t is not None and t.numel() == size:
            flat[offset:offset + size] = t.detach().reshape(-1).to(device, torch.float32)
            flat[sum(sizes) + i] = 1.0
        offset += size
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    counts = flat[sum(sizes):]
    out: list[Optional[torch.Tensor]] = []
    offset = 0
    for i, size in enumerate(sizes):
        c = float(counts[i])
        out.append(None if c == 0 else flat[offset:offset + size] / c)
        offset += size
    return out


def mean_dict_over_ranks(values: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    """Mean over processes of ``values[k]`` for every ``k`` in ``keys`` (a missing key counts as 0.0)."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(keys)
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64)
    (reduced,) = mean_over_ranks([t], [len(keys)])
    return {k: float(v) for k, v in zip(keys, reduced.tolist())}


@torch.no_grad()
def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of parameters DDP does not manage, in place (one collective).

    A parameter without a gradient on every rank keeps ``None``; one that has a gradient on some ranks only gets
    the mean over those (so every rank ends with the same gradient)."""
    if world_size() == 1 or not params:
        return
    reduced = mean_over_ranks([p.grad for p in params], [p.numel() for p in params])
    for p, g in zip(params, reduced):
        if g is not None:
            p.grad = g.view_as(p).to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place) with rank ``src``'s values, one collective per dtype."""
    if world_size() == 1 or not tensors:
        return
    device = _comm_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype in sorted(by_dtype, key=str):
        group = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.device))
            offset += t.numel()


# ---------------------------------------------------------------------------------------------- setup checks
def _accelerate_type() -> Optional[str]:
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a transformers Trainer dependency
        return None
    if not AcceleratorState._shared_state:
        return None
    kind = getattr(AcceleratorState(), "distributed_type", None)
    return None if kind is None else str(getattr(kind, "value", kind))


def _truthy(value) -> bool:
    return bool(value) and str(value).lower() not in ("false", "0", "no", "none")


def unsupported_setups(args, model: Optional[nn.Module] = None) -> list[str]:
    """Names of the parallel setups in use that APT does not support (empty when it is fine)."""
    found: list[str] = []
    if _truthy(getattr(args, "deepspeed", None)) or getattr(args, "deepspeed_plugin", None) is not None \
            or _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
        found.append("DeepSpeed")
    if getattr(args, "fsdp_plugin_args", None) or _truthy(os.environ.get("ACCELERATE_USE_FSDP")):
        found.append("FSDP")
    kind = _accelerate_type()
    names = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP", "MEGATRON_LM": "Megatron-LM", "XLA": "XLA/TPU"}
    if kind in names and names[kind] not in found:
        found.append(names[kind])
    if getattr(args, "parallelism_config", None) is not None:
        found.append("parallelism_config (tensor/context/sequence parallelism)")
    if getattr(args, "n_gpu", 1) > 1:
        found.append(f"torch.nn.DataParallel ({args.n_gpu} GPUs in one process; launch one process per GPU)")
    if model is not None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()
        if DTensor and any(isinstance(p, DTensor) for p in model.parameters()):
            found.append("DTensor parameters (tp_plan / device_mesh loading)")
    return found


def check_supported(args, model: Optional[nn.Module], has_rebuilder: bool) -> None:
    """Raise :class:`UnsupportedParallelismError` unless the run is one process or DDP under APTTrainer."""
    found = unsupported_setups(args, model)
    if found:
        raise UnsupportedParallelismError(
            f"APT prunes parameters physically during training, which {', '.join(found)} cannot follow. "
            f"Supported: {SUPPORTED}.")
    if world_size() > 1 and not has_rebuilder:
        raise UnsupportedParallelismError(
            f"APT is running in {world_size()} processes with a stock transformers Trainer. Each pruning event "
            "replaces parameters, and a Trainer callback cannot rebuild the DistributedDataParallel wrapper, so "
            "gradients of the new parameters would not be synchronized. Use apt_hf.APTTrainer (it rebuilds the "
            "wrapper after every event) instead of Trainer + APTCallback.")


# ---------------------------------------------------------------------------------------------- DDP rebuild
def find_ddp(model: nn.Module) -> Optional[nn.parallel.DistributedDataParallel]:
    """The DistributedDataParallel wrapper in ``model`` (itself, or under torch.compile's ``_orig_mod``)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)
        seen += 1
    return None


def check_rewrappable(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Raise if ``ddp`` uses a feature :func:`rewrap_ddp` cannot carry over."""
    if getattr(ddp, "mixed_precision", None) is not None:
        raise UnsupportedParallelismError("APT cannot rebuild a DistributedDataParallel wrapper built with DDP's own "
                                          "mixed_precision=...; use the Trainer's fp16/bf16 instead.")
    if getattr(ddp, "_delay_all_reduce_params", None) or getattr(ddp, "_use_python_reducer", False):
        raise UnsupportedParallelismError("APT cannot rebuild a DistributedDataParallel wrapper with delayed "
                                          "all-reduce or the compiled (python) reducer.")


def exclude_from_ddp(module: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """Make DDP ignore ``params`` of ``module`` (the module it will wrap); returns their names.

    For parameters used outside the wrapped forward (APT's distillation transform runs on the returned hidden
    states), which DDP's reducer cannot track; their gradients are averaged by :func:`average_gradients`."""
    ids = {id(p) for p in params}
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids]
    existing = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    module._ddp_params_and_buffers_to_ignore = sorted(set(existing) | set(names))
    return names


def rewrap_ddp(ddp: nn.parallel.DistributedDataParallel,
               register_comm_hook: Optional[Callable[[nn.parallel.DistributedDataParallel], None]] = None) -> None:
    """Re-run ``DistributedDataParallel.__init__`` on ``ddp`` itself for its module's current parameters.

    Same settings as before; ``register_comm_hook(ddp)`` (accelerate's ``ddp_handler.register_comm_hook``, which
    builds fresh hook state) re-installs the communication hook, otherwise the hooks registered before are
    re-registered with their state. Must run on every rank at the same point, outside forward/backward.
    """
    check_rewrappable(ddp)
    module = ddp.module
    saved_hooks = list(getattr(ddp, "_comm_hooks", []))
    kwargs = dict(device_ids=ddp.device_ids, output_device=ddp.output_device, dim=ddp.dim,
                  broadcast_buffers=ddp.broadcast_buffers, find_unused_parameters=ddp.find_unused_parameters,
                  gradient_as_bucket_view=ddp.gradient_as_bucket_view, static_graph=ddp.static_graph,
                  bucket_cap_mb=ddp.bucket_bytes_cap / (1024 * 1024))
    if getattr(ddp, "device_mesh", None) is not None:
        kwargs["device_mesh"] = ddp.device_mesh
    else:
        kwargs["process_group"] = ddp.process_group
    if getattr(ddp, "skip_all_reduce_unused_params", False):
        kwargs["skip_all_reduce_unused_params"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `broadcast_buffers` is deprecated in newer torch
        nn.parallel.DistributedDataParallel.__init__(ddp, module, **kwargs)
    if register_comm_hook is not None:
        register_comm_hook(ddp)
    if not ddp._comm_hooks:
        for hook, state in saved_hooks:
            ddp.register_comm_hook(state, hook)


__all__ = ["SUPPORTED", "UnsupportedParallelismError", "average_gradients", "broadcast_", "check_supported",
           "exclude_from_ddp", "find_ddp",
           "mean_dict_over_ranks", "mean_over_ranks", "rank", "rewrap_ddp", "unsupported_setups", "world_size"]
