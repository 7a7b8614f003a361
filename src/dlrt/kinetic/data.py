"""Training data for the neural closures, sampled in multiplier (α) space (docs/kinetic.md §3).

Sampling ``α`` instead of ``u`` needs no optimisation: draw ``α_r`` uniformly in
``[−b, b]^{n−1}``, set ``α₀`` so that ``u₀ = 1`` (:func:`~dlrt.kinetic.closure.alpha0`),
and read off ``u = ⟨m exp(α·m)⟩ + γ (0, α_r)`` and ``h = α·u − ⟨exp(α·m)⟩ − (γ/2)‖α_r‖²``.
Samples whose Hessian ``⟨m mᵀ exp(α·m)⟩`` has its smallest eigenvalue below
``min_eig`` are rejected: near the realizability boundary the closure is so
ill-conditioned that neither Newton nor a network resolves it (the conditioning
filter of Schotthöfer et al. 2024).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import io
from .basis import Basis, make_basis
from .closure import alpha0, dual_hessian, entropy, moments

__all__ = ["ClosureData", "load_data", "sample", "save_data"]

FORMAT = "dlrt-closure-data"
VERSION = 1


@dataclass
class ClosureData:
    """Normalised samples of the closure: ``u`` (``B×n``, ``u₀ = 1``), ``alpha`` (``B×n``), ``h`` (``B``).

    ``meta`` records how they were made: basis ``kind``/``order``/``dim``/``quadrature``,
    ``gamma``, ``bound``, ``min_eig``, ``seed``.
    """

    u: Tensor
    alpha: Tensor
    h: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.u.shape[0]

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> ClosureData:
        """The samples on ``device`` in ``dtype``."""
        return ClosureData(*(t.to(device, dtype) for t in (self.u, self.alpha, self.h)), dict(self.meta))

    def basis(self, dtype: torch.dtype = torch.float64) -> Basis:
        """The basis the samples were made with."""
        m = self.meta
        return make_basis(m["kind"], m["order"], m["dim"], m["quadrature"], device=self.u.device, dtype=dtype)

    def split(self, fraction: float, seed: int = 0) -> tuple[ClosureData, ClosureData]:
        """A random ``(1 − fraction, fraction)`` split (training, validation)."""
        if not 0 < fraction < 1:
            raise ValueError(f"a validation fraction lies in (0, 1), got {fraction}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).to(self.u.device)
        k = max(1, round(fraction * len(self)))
        a, b = perm[k:], perm[:k]
        return (
            ClosureData(self.u[a], self.alpha[a], self.h[a], dict(self.meta)),
            ClosureData(self.u[b], self.alpha[b], self.h[b], dict(self.meta)),
        )


def sample(
    basis: Basis,
    count: int,
    *,
    gamma: float = 0.0,
    bound: float = 10.0,
    min_eig: float = 1e-6,
    seed: int = 0,
    max_tries: int = 100,
) -> ClosureData:
    """``count`` samples of the closure for ``basis``, drawn in α space and filtered by conditioning.

    Args:
        basis: moment basis and quadrature (its dtype and device are used).
        count: number of samples kept.
        gamma: regularization ``γ ≥ 0``.
        bound: ``α_r`` is uniform in ``[−bound, bound]`` componentwise.
        min_eig: keep samples whose Hessian's smallest eigenvalue is ``≥ min_eig``.
        seed: seeds the draw (a ``torch.Generator`` on the CPU).
        max_tries: give up (``ValueError``) after drawing ``max_tries · count`` candidates.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    if gamma < 0 or min_eig < 0:
        raise ValueError(f"gamma and min_eig must be >= 0, got gamma={gamma}, min_eig={min_eig}")
    gen = torch.Generator().manual_seed(seed)
    kept: list[Tensor] = []
    have = drawn = 0
    chunk = max(1024, 2 * count)
    while have < count:
        if drawn >= max_tries * count:
            raise ValueError(
                f"the conditioning filter kept only {have} of {drawn} samples (min_eig={min_eig:g}, bound={bound:g}): "
                "lower min_eig or the bound"
            )
        ar = (torch.rand(chunk, basis.n - 1, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        ar = ar.to(basis.m.device, basis.m.dtype)
        drawn += chunk
        a = torch.cat([alpha0(ar, basis)[:, None], ar], -1)
        lam = torch.linalg.eigvalsh(dual_hessian(a, basis))[:, 0]
        a = a[lam >= min_eig]
        kept.append(a)
        have += a.shape[0]
    alpha = torch.cat(kept)[:count]
    u = moments(alpha, basis, gamma)
    h = entropy(alpha, u, basis, gamma)
    meta = {
        "kind": basis.kind,
        "order": basis.order,
        "dim": basis.dim,
        "quadrature": _quadrature_points(basis),
        "gamma": float(gamma),
        "bound": float(bound),
        "min_eig": float(min_eig),
        "seed": int(seed),
        "count": int(count),
        "accepted": have / drawn,  # the share of draws the filter kept
    }
    return ClosureData(u, alpha, h, meta)


def _quadrature_points(basis: Basis) -> int:
    """The ``quadrature`` argument of :func:`make_basis` that rebuilds ``basis``."""
    if basis.dim == 1:
        return basis.w.numel()
    return round((basis.w.numel() / 2) ** 0.5)


def save_data(path: str | os.PathLike[str], data: ClosureData) -> Path:
    """Write ``data`` to ``path`` (safetensors, its ``meta`` as JSON metadata), atomically."""
    from safetensors.torch import save_file

    tensors = {k: getattr(data, k).detach().contiguous().cpu() for k in ("u", "alpha", "h")}
    header = json.dumps({"format": FORMAT, "version": VERSION, **data.meta})
    return io.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={FORMAT: header}))


def load_data(path: str | os.PathLike[str], *, device: Any = None) -> ClosureData:
    """Read a dataset written by :func:`save_data`; a file that is not one gives a ``ValueError`` saying why."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no closure dataset at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(FORMAT)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a closure dataset (no {FORMAT!r} metadata)")
    meta = json.loads(raw)
    if meta.pop("format", None) != FORMAT or meta.pop("version", None) != VERSION:
        raise ValueError(f"{path}: unsupported closure dataset version")
    missing = {"u", "alpha", "h"} - set(tensors)
    if missing:
        raise ValueError(f"{path}: the dataset lacks the tensors {sorted(missing)}")
    u, alpha, h = (tensors[k].to(device) for k in ("u", "alpha", "h"))
    if u.shape != alpha.shape or h.shape != u.shape[:1]:
        raise ValueError(
            f"{path}: inconsistent shapes u {tuple(u.shape)}, alpha {tuple(alpha.shape)}, h {tuple(h.shape)}"
        )
    return ClosureData(u, alpha, h, meta)
