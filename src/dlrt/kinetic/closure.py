"""The (regularized) Maxwell–Boltzmann entropy closure and its batched Newton solver (docs/kinetic.md §2).

For moments ``u ∈ ℝⁿ`` of a density over velocity space, the closure solves the dual problem

    α(u) = argmin_α φ(α),   φ(α) = ⟨exp(α·m)⟩ − α·u + (γ/2)‖α_r‖²,

(``α_r``: every component but the zeroth), whose gradient and Hessian are

    ∇φ = ⟨m exp(α·m)⟩ + γ (0, α_r) − u,    ∇²φ = ⟨m mᵀ exp(α·m)⟩ + γ diag(0, 1, …, 1).

The entropy is ``h_γ(u) = −φ(α(u))``, with ``∇h_γ = α`` and closed density
``f = exp(α·m)``. ``γ = 0`` is the classical M_N closure (only realizable ``u``
have a solution); ``γ > 0`` regularizes it (every ``u`` with ``u₀ > 0`` has one).
Every function works on a batch of cells (leading dimension) at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .basis import Basis

__all__ = [
    "NewtonResult",
    "alpha0",
    "check_realizable",
    "dual_gradient",
    "dual_hessian",
    "dual_objective",
    "entropy",
    "moments",
    "newton",
    "normalize",
    "realizable",
    "scale_back",
]


def _exp(alpha: Tensor, basis: Basis) -> Tensor:
    """``exp(α·m(v_q))`` at every node: ``B×Q``."""
    return torch.exp(alpha @ basis.m.mT)


def _reg(alpha: Tensor, gamma: float) -> Tensor:
    r = gamma * alpha
    return torch.cat([torch.zeros_like(r[..., :1]), r[..., 1:]], -1)


def moments(alpha: Tensor, basis: Basis, gamma: float = 0.0) -> Tensor:
    """The moments the multipliers ``α`` reproduce: ``⟨m exp(α·m)⟩ + γ (0, α_r)`` (``B×n``)."""
    return (_exp(alpha, basis) * basis.w) @ basis.m + _reg(alpha, gamma)


def dual_objective(alpha: Tensor, u: Tensor, basis: Basis, gamma: float = 0.0) -> Tensor:
    """``φ(α) = ⟨exp(α·m)⟩ − α·u + (γ/2)‖α_r‖²`` per cell (``B``)."""
    reg = 0.5 * gamma * (alpha[..., 1:] ** 2).sum(-1)
    return _exp(alpha, basis) @ basis.w - (alpha * u).sum(-1) + reg


def dual_gradient(alpha: Tensor, u: Tensor, basis: Basis, gamma: float = 0.0) -> Tensor:
    """``∇φ(α) = ⟨m exp(α·m)⟩ + γ (0, α_r) − u`` (``B×n``): zero at the closure."""
    return moments(alpha, basis, gamma) - u


def dual_hessian(alpha: Tensor, basis: Basis, gamma: float = 0.0) -> Tensor:
    """``∇²φ(α) = ⟨m mᵀ exp(α·m)⟩ + γ diag(0, 1, …, 1)`` (``B×n×n``), symmetric positive definite."""
    e = _exp(alpha, basis) * basis.w
    n = basis.n
    H = (e @ (basis.m[:, :, None] * basis.m[:, None, :]).reshape(-1, n * n)).reshape(*e.shape[:-1], n, n)
    if gamma:
        d = torch.full((basis.n,), gamma, dtype=H.dtype, device=H.device)
        d[0] = 0
        H = H + torch.diag(d)
    return H


def entropy(alpha: Tensor, u: Tensor, basis: Basis, gamma: float = 0.0) -> Tensor:
    """``h_γ(u) = α·u − ⟨exp(α·m)⟩ − (γ/2)‖α_r‖² = −φ(α)``, exact when ``α = α(u)``."""
    return -dual_objective(alpha, u, basis, gamma)


def _m0(basis: Basis) -> float:
    """The constant value of the zeroth basis function (1 for monomials, 1/(2√π) for ``Y₀⁰``)."""
    return float(basis.m[0, 0])


def normalize(u: Tensor) -> tuple[Tensor, Tensor]:
    """``(u / u₀, u₀)``: moments scaled to ``u₀ = 1`` (what the networks see), and the scale."""
    u0 = u[..., :1]
    if not bool((u0 > 0).all()):
        raise ValueError("normalizing moments needs u₀ > 0 in every cell (a density has positive mass)")
    return u / u0, u0[..., 0]


def scale_back(alpha_hat: Tensor, h_hat: Tensor, u0: Tensor, basis: Basis) -> tuple[Tensor, Tensor]:
    """``(α(u), h(u))`` from the closure of ``û = u / u₀`` (exact for ``γ = 0``).

    ``exp((α̂ + (ln u₀ / m₀) e₀)·m) = u₀ exp(α̂·m)``, so ``α(u) = α̂ + (ln u₀ / m₀) e₀`` and
    ``h(u) = u₀ h(û) + u₀ ln u₀ / m₀``.
    """
    shift = torch.log(u0) / _m0(basis)
    alpha = alpha_hat.clone()
    alpha[..., 0] = alpha[..., 0] + shift
    return alpha, u0 * h_hat + u0 * shift


def alpha0(alpha_r: Tensor, basis: Basis) -> Tensor:
    """``α₀`` that makes ``⟨m₀ exp(α·m)⟩ = 1`` for given ``α_r``: ``−ln(m₀ ⟨exp(α_r·m_r)⟩) / m₀``.

    Computed with a log-sum-exp, so large ``α_r`` do not overflow.
    """
    c = _m0(basis)
    z = alpha_r @ basis.m[:, 1:].mT + torch.log(basis.w)
    return -(torch.logsumexp(z, -1) + torch.log(torch.as_tensor(c, dtype=z.dtype))) / c


def realizable(u: Tensor, basis: Basis) -> Tensor:
    """Which cells hold realizable moments (``B`` booleans): moments of some positive density.

    1D monomials: the Hausdorff conditions on ``[−1, 1]`` (Hankel matrices of ``u``
    positive definite; exact). Sphere: ``u₀ > 0`` and ``|⟨v f⟩| < ⟨f⟩`` (necessary
    only; the Newton solver reports what these let through).
    """
    finite = torch.isfinite(u).all(-1)
    u = torch.where(finite[..., None], u, torch.ones_like(u))
    c = _m0(basis)
    pos = u[..., 0] * c > 0
    u_hat = u / torch.where(pos, u[..., 0], torch.ones_like(u[..., 0]))[..., None]
    ok = finite & pos
    if basis.dim == 1:
        N = basis.order
        k = N // 2
        idx = torch.arange(k + 1, device=u.device)
        if N % 2 == 0:
            H1 = u_hat[..., idx[:, None] + idx[None, :]]
            j = idx[:k]
            H2 = u_hat[..., j[:, None] + j[None, :]] - u_hat[..., j[:, None] + j[None, :] + 2]
        else:
            H1 = u_hat[..., idx[:, None] + idx[None, :]] + u_hat[..., idx[:, None] + idx[None, :] + 1]
            H2 = u_hat[..., idx[:, None] + idx[None, :]] - u_hat[..., idx[:, None] + idx[None, :] + 1]
        for H in (H1, H2):
            if H.shape[-1]:
                ok = ok & (torch.linalg.eigvalsh(H)[..., 0] > 0)
        return ok
    if basis.kind == "monomial":
        flux = u_hat[..., 1:4]
    else:  # Y₁ = √(3/4π) (y, z, x), Y₀⁰ = 1/(2√π)
        flux = u_hat[..., 1:4] * c / (3 / (4 * torch.pi)) ** 0.5
    return ok & (flux.norm(dim=-1) < 1)


def check_realizable(u: Tensor, basis: Basis) -> None:
    """Raise :class:`ValueError` naming the first non-realizable cells of ``u`` (see :func:`realizable`)."""
    if u.shape[-1] != basis.n:
        raise ValueError(f"moments have {u.shape[-1]} components; this basis has n = {basis.n}")
    bad = (~realizable(u, basis)).nonzero().flatten()
    if bad.numel():
        first = bad[:5].tolist()
        raise ValueError(
            f"{bad.numel()} cell(s) hold non-realizable moments (first: cells {first}, u = {u[bad[0]].tolist()}): "
            "the M_N closure (gamma=0) has no solution there; fix the moments or use the regularized closure (gamma>0)"
        )


@dataclass
class NewtonResult:
    """The closure of a batch: multipliers ``alpha`` (``B×n``), entropy ``h`` (``B``), Newton iterations, residual."""

    alpha: Tensor
    h: Tensor
    iterations: int
    residual: float


def newton(
    u: Tensor,
    basis: Basis,
    gamma: float = 0.0,
    *,
    tol: float = 1e-11,
    max_iter: int = 200,
    alpha_init: Tensor | None = None,
    armijo: float = 1e-4,
    max_halvings: int = 40,
) -> NewtonResult:
    """Solve the dual problem in every cell by damped Newton with an Armijo backtracking line search.

    Cells converge independently (a converged cell stops moving); the loop ends
    when every cell has ``‖∇φ‖ ≤ tol · ‖u‖``. With ``γ = 0`` the moments are first
    checked for realizability and a :class:`ValueError` names the bad cells; a cell
    that still does not converge (too close to the boundary for the quadrature)
    is reported the same way, never returned as NaN.

    Args:
        u: moments, ``B×n`` (any float dtype and device; the basis follows them).
        basis: from :func:`~dlrt.kinetic.basis.make_basis`.
        gamma: regularization ``γ ≥ 0``.
        tol: relative tolerance on the moment equations.
        max_iter: Newton iterations at most.
        alpha_init: starting multipliers (default: the isotropic density of mass ``u₀``).
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if u.dim() != 2 or u.shape[-1] != basis.n:
        raise ValueError(f"u must be B×{basis.n} (cells × moments), got shape {tuple(u.shape)}")
    if not torch.is_floating_point(u):
        raise ValueError(f"u must be a floating-point tensor, got {u.dtype}")
    if alpha_init is not None and alpha_init.shape != u.shape:
        raise ValueError(f"alpha_init must have u's shape {tuple(u.shape)}, got {tuple(alpha_init.shape)}")
    basis = basis.to(u.device, u.dtype)
    if gamma == 0:
        check_realizable(u, basis)
    elif not bool((u[:, 0] * _m0(basis) > 0).all() and torch.isfinite(u).all()):
        raise ValueError("the regularized closure needs finite moments with positive mass (u₀ m₀ > 0) in every cell")
    c = _m0(basis)
    if alpha_init is None:
        alpha = torch.zeros_like(u)
        alpha[:, 0] = torch.log(u[:, 0] / (c * basis.w.sum())) / c
    else:
        alpha = alpha_init.to(u).clone()
    scale = u.norm(dim=-1).clamp_min(torch.finfo(u.dtype).tiny)
    phi = dual_objective(alpha, u, basis, gamma)
    g = dual_gradient(alpha, u, basis, gamma)
    res = g.norm(dim=-1) / scale
    it = 0
    while it < max_iter:
        active = (res > tol).nonzero().flatten()
        if active.numel() == 0:
            break
        it += 1
        a, ua, ga = alpha[active], u[active], g[active]
        H = dual_hessian(a, basis, gamma)
        L, info = torch.linalg.cholesky_ex(H)
        d = -torch.cholesky_solve(ga[..., None], L)[..., 0]
        bad = info != 0
        if bool(bad.any()):  # numerically singular Hessian: fall back to steepest descent there
            d = torch.where(bad[:, None], -ga, d)
        slope = (ga * d).sum(-1)
        t = torch.ones_like(slope)
        phi_a = phi[active]
        slack = 16 * torch.finfo(u.dtype).eps * ((a * ua).abs().sum(-1) + ua[:, 0].abs() + phi_a.abs())
        trial = a + d
        phi_t = dual_objective(trial, ua, basis, gamma)
        for _ in range(max_halvings):
            # a slack of the rounding error of φ's terms accepts the last, roundoff-limited steps near the solution
            reject = ~(phi_t <= phi_a + armijo * t * slope + slack)
            if not bool(reject.any()):
                break
            t = torch.where(reject, 0.5 * t, t)
            trial = torch.where(reject[:, None], a + t[:, None] * d, trial)
            phi_t = torch.where(reject, dual_objective(trial, ua, basis, gamma), phi_t)
        ok = torch.isfinite(phi_t) & torch.isfinite(trial).all(-1)
        trial = torch.where(ok[:, None], trial, a)
        alpha[active] = trial
        phi[active] = torch.where(ok, phi_t, phi_a)
        g_new = dual_gradient(trial, ua, basis, gamma)
        g[active] = g_new
        r_new = g_new.norm(dim=-1) / scale[active]
        res[active] = torch.where(ok, r_new, torch.full_like(r_new, float("inf")))
        if not bool(ok.all()):
            break
    worst = float(res.max()) if res.numel() else 0.0
    if not worst <= tol:
        failed = (~(res <= tol)).nonzero().flatten()
        raise ValueError(
            f"Newton did not converge in {failed.numel()} cell(s) after {it} iterations (first: cells "
            f"{failed[:5].tolist()}, relative residual {worst:.2e} > tol {tol:g}): the moments lie (too close to) "
            "outside the realizable set of this quadrature; use more quadrature points, a looser tol, or gamma>0"
        )
    return NewtonResult(alpha, -phi, it, worst)
