"""Pictures of APT runs, from any run's log history or output folder (matplotlib; ``pip install "apt_hf[plot]"``).

- :func:`plot_schedule`: kept density, the target density and the mean adapter rank per optimizer step (step
  plots), with the pruning events, the self-distillation phase and its weight mu marked.
- :func:`plot_structure`: the heads and FFN neurons each layer keeps, as heat maps; from an APT model, a saved
  adapter or checkpoint (which original units survive) or an export's ``apt_structure.json`` (how many).
- :func:`plot_tradeoff`: the dev metric against density (or inference speed-up) across runs.

Command line: ``python -m apt_hf.plot RUN [RUN ...] [--out DIR]`` writes ``apt_schedule.png`` and
``apt_structure.png`` for every run folder (a ``Trainer`` output folder, a checkpoint, a ``run_glue.py`` output
folder) and, for several runs or a benchmark results file, ``apt_tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
from torch import nn

from .model import BASE_SIZES_ATTR, MASKS_ATTR, find_apt_model

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["Structure", "load_log_history", "load_runs", "load_structure", "plot_schedule", "plot_structure",
           "plot_tradeoff", "main"]
PathLike = Union[str, Path]
# Matplotlib marker / line-style cycles, so that overlapping lines stay apart without colour too.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('apt_hf.plot needs matplotlib: pip install "apt_hf[plot]" (or pip install matplotlib)') \
            from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Figure, path: Optional[PathLike]) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        _pyplot().close(fig)
    return fig


# ---------------------------------------------------------------------------------------------------- inputs
def _latest_checkpoint(folder: Path) -> Optional[Path]:
    steps = [(int(m[1]), p) for p in folder.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return max(steps)[1] if steps else None


def load_log_history(source: PathLike) -> list[dict]:
    """``state.log_history`` of a run: from ``trainer_state.json`` or a ``run_glue.py`` ``summary.json`` (a file, or a
    folder holding one, or its newest ``checkpoint-*``)."""
    path = Path(source)
    if path.is_dir():
        candidates = [path / "trainer_state.json", path / "summary.json"]
        checkpoint = _latest_checkpoint(path)
        if checkpoint is not None:
            candidates.append(checkpoint / "trainer_state.json")
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{source} holds no trainer_state.json, summary.json or checkpoint-*/"
                                    "trainer_state.json; pass a Trainer output folder or one of those files.")
    history = json.loads(Path(path).read_text()).get("log_history")
    if history is None:
        raise ValueError(f"{path} has no log_history; pass a Trainer's trainer_state.json or run_glue's summary.json.")
    return history


@dataclass
class Structure:
    """What each layer keeps. ``heads[i]`` / ``neurons[i]``: a boolean row over the original units of attention /
    FFN site ``i`` when the surviving positions are known, else ``None`` (then only ``*_kept`` counts are)."""

    heads_kept: list[int]
    neurons_kept: list[int]
    heads: Optional[list[np.ndarray]] = None
    neurons: Optional[list[np.ndarray]] = None


def _rows(kept: list, alive: list, totals: list[int]) -> list[np.ndarray]:
    rows = []
    for positions, mask, total in zip(kept, alive, totals):
        row = np.zeros(int(total), dtype=bool)
        row[np.asarray(positions, dtype=np.int64)[np.asarray(mask) > 0]] = True
        rows.append(row)
    return rows


def _from_records(records: dict[str, Any]) -> Structure:
    """From mask values, kept-position records and base sizes (an APT model's buffers or a saved adapter)."""
    n_att = sum(1 for k in records if re.fullmatch(r"kept_heads_\d+", k))
    n_ffn = sum(1 for k in records if re.fullmatch(r"kept_neurons_\d+", k))
    sizes = [int(v) for v in records[BASE_SIZES_ATTR]]
    heads = _rows([records[f"kept_heads_{i}"] for i in range(n_att)], [records[f"heads_{i}"] for i in range(n_att)],
                  sizes[:n_att])
    neurons = _rows([records[f"kept_neurons_{i}"] for i in range(n_ffn)],
                    [records[f"neurons_{i}"] for i in range(n_ffn)], sizes[n_att:n_att + n_ffn])
    return Structure([int(r.sum()) for r in heads], [int(r.sum()) for r in neurons], heads, neurons)


def load_structure(source: Union[nn.Module, PathLike]) -> Structure:
    """The kept heads and neurons of an APT model, a saved APT adapter / checkpoint folder (the trained model's
    records of which original units survive; a run folder's newest checkpoint is used when the folder itself
    holds no adapter), or an export folder's ``apt_structure.json`` (counts per layer only)."""
    if isinstance(source, nn.Module):
        apt = find_apt_model(source)
        buffers = {name: t.detach().cpu().numpy() for name, t in apt.masks.named_buffers()}
        return _from_records({**buffers, BASE_SIZES_ATTR: getattr(apt, BASE_SIZES_ATTR).cpu().numpy()})
    folder = Path(source)
    checkpoint = _latest_checkpoint(folder) if folder.is_dir() else None
    for candidate in (folder, checkpoint):
        if candidate is not None and (candidate / "adapter_model.safetensors").is_file():
            from safetensors.numpy import load_file

            state = load_file(str(candidate / "adapter_model.safetensors"))
            records = {k.split(f"{MASKS_ATTR}.", 1)[1]: v for k, v in state.items() if f"{MASKS_ATTR}." in k}
            sizes = next((v for k, v in state.items() if k.endswith(BASE_SIZES_ATTR)), None)
            if records and sizes is not None:
                return _from_records({**records, BASE_SIZES_ATTR: sizes})
    for candidate in (folder / "apt_structure.json", folder / "pruned_model" / "apt_structure.json"):
        if candidate.is_file():
            record = json.loads(candidate.read_text())
            return Structure(list(record["heads"]), list(record["neurons"]))
    raise FileNotFoundError(f"{source} holds no APT adapter (adapter_model.safetensors with APT masks) and no "
                            "apt_structure.json; pass an APT model, a checkpoint or an export folder.")


def _is_results_file(path: Path) -> bool:
    """Whether ``path`` is a ``benchmarks/glue_benchmark.py`` results file (several runs under ``"runs"``)."""
    return path.is_file() and path.suffix == ".json" and "runs" in json.loads(path.read_text())


def _run_point(name: str, summary: dict, metric: Optional[str]) -> dict:
    """Name, final dev metric, density and speed-up of one run (``run_glue.py``'s summary or a log history)."""
    history = summary.get("log_history", [])
    if "metric_value" in summary and metric in (None, summary.get("metric")):
        value, metric = summary["metric_value"], summary["metric"]
    else:
        evals = [h for h in history if any(k.startswith("eval_") for k in h)]
        keys = [k[5:] for k in (evals[-1] if evals else {}) if k.startswith("eval_") and "runtime" not in k
                and "per_second" not in k and k != "eval_loss"]
        metric = metric or next(iter(keys), None)
        values = [h[f"eval_{metric}"] for h in evals if f"eval_{metric}" in h]
        if not values:
            raise ValueError(f"run {name} has no evaluation of {metric!r}; evaluate during training or pass --metric.")
        value = values[-1]
    densities = [h["apt/density"] for h in history if "apt/density" in h]
    density = summary.get("density", densities[-1] if densities else 1.0)
    speedup = summary.get("speedup") or (1.0 if density >= 1.0 else None)  # a dense model is the 1x reference
    return {"name": name, "metric": metric, "value": value, "density": density, "speedup": speedup}


def load_runs(sources: Sequence[PathLike], metric: Optional[str] = None) -> list[dict]:
    """One point per run for :func:`plot_tradeoff`: run folders, ``summary.json`` / ``trainer_state.json`` files,
    or a ``benchmarks/glue_benchmark.py`` results file (one point per method)."""
    points = []
    for source in sources:
        path = Path(source)
        if _is_results_file(path):
            points += [_run_point(name, run, metric) for name, run in json.loads(path.read_text())["runs"].items()]
            continue
        summary_file = path / "summary.json" if path.is_dir() else path
        summary = json.loads(summary_file.read_text()) if summary_file.name == "summary.json" and \
            summary_file.is_file() else {"log_history": load_log_history(path)}
        points.append(_run_point(path.name if path.is_dir() else path.parent.name, summary, metric))
    return points


# ---------------------------------------------------------------------------------------------------- plots
def plot_schedule(log_history: Union[list[dict], PathLike], path: Optional[PathLike] = None,
                  title: str = "APT schedule") -> Figure:
    """Kept and target density and mean adapter rank per step, with pruning events and the distillation phase."""
    history = load_log_history(log_history) if isinstance(log_history, (str, Path)) else log_history
    logs = sorted((h for h in history if "apt/density" in h), key=lambda h: h["step"])
    if not logs:
        raise ValueError("the log history has no apt/* figures: it is not from an APT run (APTCallback/APTTrainer).")
    plt = _pyplot()
    steps = [h["step"] for h in logs]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.step(steps, [h["apt/density"] for h in logs], where="post", color="C0", lw=1.8, label="kept density")
    ax.step(steps, [h["apt/target_density"] for h in logs], where="post", color="C0", ls=":", lw=1.2,
            label="next target density")
    distill = [h for h in history if "apt/mu" in h]
    if distill:
        first, last = min(h["step"] for h in distill), max(h["step"] for h in distill)
        ax.axvspan(first, last, color="C2", alpha=0.12, label="self-distillation")
        ax.plot([h["step"] for h in distill], [h["apt/mu"] for h in distill], color="C2", ls="--", marker=".",
                ms=3, lw=1, label="mu (distillation weight)")
    for i, step in enumerate(sorted({h["step"] for h in history if "apt/event" in h})):
        ax.axvline(step, color="grey", ls="--", lw=0.8, label="pruning event" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("density (kept / original params), mu")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    rank = ax.twinx()
    rank.step(steps, [h["apt/mean_rank"] for h in logs], where="post", color="C3", lw=1.5, marker="s", ms=2.5,
              label="mean adapter rank")
    rank.set_ylabel("mean adapter rank")
    handles = ax.get_legend_handles_labels()
    more = rank.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_structure(source: Union[Structure, nn.Module, PathLike], path: Optional[PathLike] = None,
                   title: str = "Kept structure per layer") -> Figure:
    """Heat maps of the kept heads and FFN neurons of every layer (dark: kept), or of the kept counts per layer when
    only counts are known (an export's ``apt_structure.json``)."""
    structure = source if isinstance(source, Structure) else load_structure(source)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * max(len(structure.heads_kept), 4) + 1.6),
                             gridspec_kw={"width_ratios": [1, 3]})
    panels = (("heads", structure.heads, structure.heads_kept), ("FFN neurons", structure.neurons,
                                                                   structure.neurons_kept))
    for ax, (what, rows, counts) in zip(axes, panels):
        if rows is not None:
            width = max((len(r) for r in rows), default=1)
            image = np.full((len(rows), width), np.nan)
            for i, row in enumerate(rows):
                image[i, :len(row)] = row
            ax.imshow(image, aspect="auto", cmap="Blues", vmin=-0.15, vmax=1, interpolation="nearest")
            ax.set_xlabel(f"{what} (original position)")
            labels = [f"{i}: {c}/{len(r)}" for i, (c, r) in enumerate(zip(counts, rows))]
        else:
            ax.imshow(np.asarray(counts, dtype=float)[:, None], aspect="auto", cmap="Blues", vmin=0,
                      interpolation="nearest")
            for i, c in enumerate(counts):
                ax.text(0, i, str(c), ha="center", va="center", fontsize=8,
                        color="white" if c > 0.6 * max(counts) else "black")
            ax.set_xticks([])
            ax.set_xlabel(f"kept {what}")
            labels = [str(i) for i in range(len(counts))]
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("layer" + (": kept / total" if rows is not None else ""))
        ax.set_title(f"{what}: {sum(counts)} kept")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_tradeoff(runs: Union[list[dict], Sequence[PathLike]], path: Optional[PathLike] = None, x: str = "density",
                  title: Optional[str] = None) -> Figure:
    """The dev metric of several runs against their density (``x="density"``) or inference speed-up
    (``x="speedup"``); ``runs`` are :func:`load_runs` points or what it reads."""
    points = runs if runs and isinstance(runs[0], dict) else load_runs(runs)
    if x not in ("density", "speedup"):
        raise ValueError(f"x={x!r}: use 'density' or 'speedup'.")
    plotted = [p for p in points if p.get(x) is not None]
    if not plotted:
        raise ValueError(f"none of the runs records {x!r} (the speed-up is measured by run_glue.py for APT runs).")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, p in enumerate(plotted):
        ax.plot(p[x], p["value"], ls="none", marker=MARKERS[i % len(MARKERS)], ms=8, color=f"C{i % 10}",
                label=p["name"])
        ax.annotate(p["name"], (p[x], p["value"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    metrics = sorted({p["metric"] for p in plotted})
    ax.set_xlabel("density (kept / original params)" if x == "density" else "inference speed-up vs dense (x)")
    ax.set_ylabel(f"dev {' / '.join(metrics)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"dev {' / '.join(metrics)} vs {x}")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    """``python -m apt_hf.plot``: see the module docstring. Returns the files written."""
    parser = argparse.ArgumentParser(prog="python -m apt_hf.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, checkpoints, trainer_state.json / summary.json files "
                                                "or a benchmark results JSON")
    parser.add_argument("--out", help="folder for the pictures (default: each run's own folder; the trade-off goes "
                                      "to the current folder)")
    parser.add_argument("--x", default="density", choices=["density", "speedup"], help="trade-off x axis")
    parser.add_argument("--metric", help="dev metric of the trade-off (default: each run's main metric)")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    written: list[Path] = []

    def target(run: Path, name: str) -> Path:
        if args.out is None:
            return (run if run.is_dir() else run.parent) / name
        return Path(args.out) / (f"{run.name}_{name}" if len(runs) > 1 else name)

    for run in (r for r in runs if not _is_results_file(r)):
        try:
            plot_schedule(run, target(run, "apt_schedule.png"), title=f"APT schedule: {run.name}")
            written.append(target(run, "apt_schedule.png"))
        except ValueError as err:  # e.g. a LoRA or full fine-tuning run
            print(f"{run}: no schedule picture ({err})")
        if run.is_dir():
            try:
                plot_structure(run, target(run, "apt_structure.png"), title=f"Kept structure per layer: {run.name}")
                written.append(target(run, "apt_structure.png"))
            except FileNotFoundError as err:
                print(f"{run}: no structure picture ({err})")
    if len(runs) > 1 or _is_results_file(runs[0]):
        written.append(Path(args.out or ".") / "apt_tradeoff.png")
        plot_tradeoff(load_runs(runs, args.metric), written[-1], x=args.x)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
