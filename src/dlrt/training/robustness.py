"""``dlrt robustness``: clean and adversarial accuracy of a trained run, written into its run directory.

The run's checkpoint is loaded into the model its config builds; the test set is
taken in pixel space (``normalize=False``) and the attacks of :mod:`dlrt.robust`
normalise it with the dataset's mean and std before the model, so ε is in pixel
units whatever the data pipeline does. Results of several attacks accumulate in
``robustness.json`` / ``robustness.csv`` (an attack run again replaces its own
entry) and ``robustness.png`` plots all of them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .. import conversion, io
from ..robust import _check_eps, condition_numbers, fgsm, pgd

JSON = "robustness.json"
CSV = "robustness.csv"
PNG = "robustness.png"
ATTACKS = ("fgsm", "pgd")


def check_request(attack: str, eps: list[float], limit: int | None, steps: int) -> list[float]:
    """Validate the attack, the ε list (pixel units, ≥ 0), ``limit`` and ``steps``; return the ε as floats."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if not eps:
        raise ValueError("give at least one ε (--eps 0.01 0.03 ...)")
    values = [_check_eps(e) for e in eps]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 (or none), got {limit!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return values


def evaluate_robustness(
    run_dir: str | os.PathLike[str],
    attack: str = "pgd",
    eps: list[float] | None = None,
    *,
    limit: int | None = None,
    steps: int = 10,
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Attack a run's checkpoint at every ε and write ``robustness.{json,csv,png}`` into ``run_dir``.

    Args:
        run_dir: a ``dlrt train`` run directory with ``config.yaml`` and ``checkpoint.safetensors``.
        attack: ``"fgsm"`` or ``"pgd"`` (L∞, ``steps`` steps of ``2.5 ε / steps``, random start).
        eps: budgets in pixel units (default ``[0.01, 0.03, 0.05, 0.1]``).
        limit: attack only the first ``limit`` test images.
        steps: PGD steps.
        batch_size: images per attack batch.
        seed: PGD's random starts (batch ``i`` uses ``seed + i``).

    Returns:
        This attack's entry of ``robustness.json``.

    Raises:
        FileNotFoundError: no run directory or no checkpoint there.
        ValueError: a bad attack, ε, limit or steps (checked before anything is loaded), or a run of
            a language model (text has no pixels to perturb).
    """
    from .config import load_config
    from .loop import CHECKPOINT, CONFIG, build_model
    from .runs import resolve_device

    eps = check_request(attack, [0.01, 0.03, 0.05, 0.1] if eps is None else list(eps), limit, steps)
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG})")
    if not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT}: the run saved no checkpoint to attack")
    cfg = load_config(run_dir / CONFIG)
    from .lm import is_language_run

    if is_language_run(cfg):
        raise ValueError(
            f"{run_dir} trained the language model {cfg.model!r} on text ({cfg.dataset!r}); the FGSM and PGD "
            "attacks perturb the pixels of images: attack a run of an image classifier"
        )
    device = resolve_device(cfg.device)
    model = build_model(cfg).to(device)
    io.load(run_dir / CHECKPOINT, model)
    model.eval()

    from ..data import get_dataset

    test = get_dataset(cfg.dataset, "test", root=cfg.data_root, normalize=False)
    n = len(test) if limit is None else min(limit, len(test))
    norm = {"mean": tuple(test.MEAN), "std": tuple(test.STD)}
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    clean = 0
    correct = [0] * len(eps)
    for i, start in enumerate(range(0, n, batch_size)):
        xs, ys = zip(*(test[j] for j in range(start, min(start + batch_size, n))))
        x, y = torch.stack(xs).to(device), torch.as_tensor(ys).to(device)
        with torch.no_grad():
            clean += int((model((x - mean) / std).argmax(-1) == y).sum())
        for k, e in enumerate(eps):
            if attack == "fgsm":
                adv = fgsm(model, x, y, e, **norm)
            else:
                adv = pgd(model, x, y, e, steps=steps, seed=seed + i, **norm)
            with torch.no_grad():
                correct[k] += int((model((adv - mean) / std).argmax(-1) == y).sum())
    cond = condition_numbers(model)
    entry = {
        "eps": eps,
        "clean_acc": clean / n,
        "adv_acc": [c / n for c in correct],
        "n": n,
        "steps": steps if attack == "pgd" else 1,
        "seed": seed,
        "compression": conversion.compression(model),
        # None where there is no core (a dense run) or one is singular: the file stays strict JSON.
        "cond_mean": _finite_or_none(sum(cond.values()) / len(cond) if cond else math.nan),
    }
    _write(run_dir, attack, entry)
    return entry


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_robustness(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The attacks recorded in ``run_dir/robustness.json`` (empty if none)."""
    path = Path(run_dir) / JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(run_dir: Path, attack: str, entry: dict[str, Any]) -> None:
    results = read_robustness(run_dir)
    results[attack] = entry
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    io.atomic_write(run_dir / JSON, lambda tmp: Path(tmp).write_text(text))
    lines = ["attack,eps,clean_acc,adv_acc,n"]
    for name, r in sorted(results.items()):
        lines += [f"{name},{e:g},{r['clean_acc']},{a},{r['n']}" for e, a in zip(r["eps"], r["adv_acc"])]
    io.atomic_write(run_dir / CSV, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    try:
        from .plots import _pyplot, _save
    except ImportError:  # pragma: no cover - matplotlib is part of the cli extra
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in sorted(results.items()):
        ax.plot([0.0, *r["eps"]], [100 * r["clean_acc"], *(100 * a for a in r["adv_acc"])], marker="o", label=name)
    ax.set(xlabel="ε (pixel units)", ylabel="accuracy (%)", title=f"adversarial accuracy, {run_dir.name}")
    ax.legend()
    _save(plt, fig, run_dir / PNG)


def format_table(results: dict[str, Any]) -> str:
    """The recorded attacks as a text table: accuracy (%) per ε."""
    lines = []
    for name, r in sorted(results.items()):
        head = "  ".join(f"ε={e:<6g}" for e in r["eps"])
        accs = "  ".join(f"{100 * a:>7.2f}%" for a in r["adv_acc"])
        lines += [f"{name:<5} clean     {head}", f"{'':<5} {100 * r['clean_acc']:>6.2f}%  {accs}"]
    return "\n".join(lines)
