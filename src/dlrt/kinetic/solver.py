"""A 1D (slab) M_N solver: the kinetic upwind scheme with a Newton or a network closure (docs/kinetic.md §5).

The linear Boltzmann equation ``∂ₜf + μ ∂ₓf = σ_s (⟨f⟩/⟨1⟩ − f) − σ_a f`` for
``μ ∈ [−1, 1]``, in moments ``u = ⟨m f⟩``, reads
``∂ₜu + ∂ₓ⟨μ m f⟩ = σ_s (u₀ ⟨m⟩/⟨1⟩ − u) − σ_a u``. The closure supplies
``f_i = exp(α(u_i)·m)`` in every cell; the kinetic scheme upwinds the density at
every quadrature node,

    F_{i+1/2} = Σ_q w_q μ_q m_q ( f_i(μ_q) if μ_q > 0 else f_{i+1}(μ_q) ),
    u_i ← u_i − Δt/Δx (F_{i+1/2} − F_{i−1/2}) + Δt σ_s (u₀ ⟨m⟩/⟨1⟩ − u_i) − Δt σ_a u_i,

stable and realizability preserving for ``Δt ≤ Δx`` and ``σΔt ≤ 1`` (forward Euler).
Boundaries: periodic, or inflow from fixed ghost states.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .basis import Basis
from .closure import newton, normalize, scale_back
from .networks import predict

__all__ = ["CASES", "NetworkClosure", "NewtonClosure", "Problem", "Solution", "periodic_case", "solve", "source_case"]


@dataclass
class Problem:
    """A 1D test case: cell centres ``x``, initial moments ``u`` (``cells×n``), boundaries, coefficients."""

    name: str
    x: Tensor
    u: Tensor
    bc: str  # "periodic" | "inflow"
    t_end: float
    sigma_s: float = 1.0
    sigma_a: float = 0.0
    left: Tensor | None = None  # inflow ghost moments
    right: Tensor | None = None

    @property
    def dx(self) -> float:
        return float(self.x[1] - self.x[0])


@dataclass
class Solution:
    """The moments at ``t``, the steps taken, and seconds spent in the closure and in total."""

    u: Tensor
    t: float
    steps: int
    closure_seconds: float
    seconds: float


class NewtonClosure:
    """``u ↦ α`` by :func:`~dlrt.kinetic.closure.newton`, warm-started from the previous step's multipliers."""

    def __init__(self, basis: Basis, gamma: float = 0.0, tol: float = 1e-11) -> None:
        self.basis, self.gamma, self.tol = basis, gamma, tol
        self._last: Tensor | None = None

    def __call__(self, u: Tensor) -> Tensor:
        init = self._last if self._last is not None and self._last.shape == u.shape else None
        alpha = newton(u, self.basis, self.gamma, tol=self.tol, alpha_init=init).alpha
        self._last = alpha
        return alpha


class NetworkClosure:
    """``u ↦ α`` by a trained network: normalise to ``u₀ = 1``, predict ``α̂``, scale back."""

    def __init__(self, model: nn.Module, basis: Basis, gamma: float = 0.0) -> None:
        self.model, self.basis, self.gamma = model, basis, gamma

    def __call__(self, u: Tensor) -> Tensor:
        u_hat, u0 = normalize(u)
        h_hat, alpha_hat, _ = predict(self.model, u_hat, self.basis, self.gamma)
        return scale_back(alpha_hat, h_hat, u0, self.basis)[0].detach()


def _isotropic(rho: Tensor, basis: Basis) -> Tensor:
    return rho[:, None] * basis.mean


def source_case(basis: Basis, cells: int = 100, t_end: float = 0.5, width: float = 0.08, floor: float = 0.1) -> Problem:
    """A smoothed plane source on ``[−1, 1]``: an isotropic Gaussian pulse on a floor density, inflow boundaries
    feeding the isotropic floor, scattering ``σ_s = 1``."""
    dtype, device = basis.m.dtype, basis.m.device
    x = -1 + (torch.arange(cells, dtype=dtype, device=device) + 0.5) * (2 / cells)
    rho = floor + torch.exp(-(x**2) / (2 * width**2)) / (math.sqrt(2 * math.pi) * width)
    ghost = _isotropic(torch.full((1,), floor, dtype=dtype, device=device), basis)[0]
    return Problem("source", x, _isotropic(rho, basis), "inflow", t_end, 1.0, 0.0, ghost, ghost)


def periodic_case(basis: Basis, cells: int = 100, t_end: float = 0.5) -> Problem:
    """A smooth periodic problem on ``[0, 1]``: ``f₀ = ρ(x)/2 (1 + ½ μ cos 2πx)``, ``ρ = 1 + ½ sin 2πx``,
    ``σ_s = 1``."""
    dtype, device = basis.m.dtype, basis.m.device
    x = (torch.arange(cells, dtype=dtype, device=device) + 0.5) / cells
    mu = basis.v[:, 0]
    rho = 1 + 0.5 * torch.sin(2 * math.pi * x)
    f0 = rho[:, None] / 2 * (1 + 0.5 * mu[None] * torch.cos(2 * math.pi * x)[:, None])
    return Problem("periodic", x, (f0 * basis.w) @ basis.m, "periodic", t_end, 1.0, 0.0)


CASES: dict[str, Callable[..., Problem]] = {"source": source_case, "periodic": periodic_case}
"""The 1D test cases of ``dlrt closure solve`` by name, each a function that builds its ``Problem``."""


def solve(problem: Problem, basis: Basis, closure: Callable[[Tensor], Tensor], *, cfl: float = 0.45) -> Solution:
    """Run ``problem`` to ``t_end`` with the kinetic scheme and ``closure`` (``u ↦ α``, ``cells×n``).

    Raises:
        ValueError: a 1D basis is needed; ``0 < cfl ≤ 1``; unknown boundary kind.
    """
    if basis.dim != 1:
        raise ValueError(f"the M_N solver is 1D (slab geometry); got a basis with dim={basis.dim}")
    if not 0 < cfl <= 1:
        raise ValueError(f"cfl must lie in (0, 1], got {cfl}")
    if problem.bc not in ("periodic", "inflow"):
        raise ValueError(f"boundary {problem.bc!r} is not 'periodic' or 'inflow'")
    if problem.bc == "inflow" and (problem.left is None or problem.right is None):
        raise ValueError("inflow boundaries need the ghost moments left= and right=")
    basis = basis.to(problem.u.device, problem.u.dtype)
    mu = basis.v[:, 0]
    right_moving = (mu > 0).to(basis.m.dtype)
    wm = basis.w[:, None] * mu[:, None] * basis.m  # Q×n: w_q μ_q m_q
    dx = problem.dx
    dt = cfl * dx
    if (problem.sigma_s + problem.sigma_a) * dt > 1:
        raise ValueError(f"σΔt = {(problem.sigma_s + problem.sigma_a) * dt:g} > 1: lower cfl")
    ghosts = None
    if problem.bc == "inflow":
        g = torch.stack([problem.left, problem.right]).to(problem.u)
        ghosts = torch.exp(newton(g, basis).alpha @ basis.m.mT)  # the ghost densities are fixed
    u, t, steps, t_closure = problem.u.clone(), 0.0, 0, 0.0
    t0 = time.perf_counter()
    while t < problem.t_end - 1e-12:
        step = min(dt, problem.t_end - t)
        c0 = time.perf_counter()
        alpha = closure(u)
        t_closure += time.perf_counter() - c0
        f = torch.exp(alpha @ basis.m.mT)  # cells×Q
        if ghosts is None:
            left_f, right_f = f[-1:], f[:1]
        else:
            left_f, right_f = ghosts[:1], ghosts[1:]
        fe = torch.cat([left_f, f, right_f])  # (cells+2)×Q
        upwind = fe[:-1] * right_moving + fe[1:] * (1 - right_moving)  # interface densities
        flux = upwind @ wm  # (cells+1)×n
        collision = problem.sigma_s * (u[:, :1] * basis.mean - u) - problem.sigma_a * u
        u = u - step / dx * (flux[1:] - flux[:-1]) + step * collision
        t += step
        steps += 1
    return Solution(u, t, steps, t_closure, time.perf_counter() - t0)
