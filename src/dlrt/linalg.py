"""Pure tensor functions shared by every layer format and integrator.

Notation follows docs/algorithms.md (one vocabulary for all methods): a matrix
``W = U S Vᵀ`` with orthonormal ``U`` (n×r), ``V`` (m×r) and core ``S`` (r×r).
Nothing in this module knows about modules, optimizers or data.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Truncation",
    "augment_basis",
    "augment_basis_with_projection",
    "galerkin",
    "global_truncation_ranks",
    "orth",
    "svd_truncate",
    "tangent_project",
    "tangent_transport",
    "truncation_rank",
]


def _qr_dtype(dtype: torch.dtype) -> torch.dtype:
    # LAPACK has no half-precision QR/SVD; factor in float32 and cast back.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@contextmanager
def small_lapack(t: Tensor) -> Iterator[None]:
    """Run the QR/SVD of small factor matrices on one CPU thread.

    Multi-threaded LAPACK on a tall-skinny ``n×2r`` QR or an ``r×r`` SVD spends
    more time in thread barriers than in arithmetic: on 2 cores a 1024×64 QR took
    1 ms on one thread and 5–130 ms on two. The thread count is restored on
    exit; CUDA tensors are unaffected.
    """
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR with ``diag(R) >= 0``, computed in at least float32."""
    work = A.to(_qr_dtype(A.dtype))
    with small_lapack(work):
        Q, R = torch.linalg.qr(work, mode="reduced")
    d = torch.diagonal(R)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return Q * sign, R * sign[:, None]


def orth(A: Tensor) -> Tensor:
    """Orthonormal basis of ``range(A)`` by reduced QR with a sign fix.

    Column signs are chosen so that ``diag(R) >= 0``, which makes the result
    deterministic across runs and processes (docs/algorithms.md §0).

    Args:
        A: an ``n×k`` matrix.

    Returns:
        ``Q`` of shape ``n×min(n, k)`` with ``QᵀQ = I``.
    """
    return _qr(A)[0].to(A.dtype)


def augment_basis(U0: Tensor, X: Tensor, max_new: int | None = None) -> Tensor:
    """See :func:`augment_basis_with_projection`; returns only ``Û``."""
    return augment_basis_with_projection(U0, X, max_new)[0]


def augment_basis_with_projection(U0: Tensor, X: Tensor, max_new: int | None = None) -> tuple[Tensor, Tensor]:
    """Orthonormal basis ``Û`` of ``range([U0, X])`` whose first columns span ``U0``.

    Built from ``QR([U0, X]) = [Q₁, Q₂] R``, never by appending
    ``orth((I − U0U0ᵀ) X)``: when the part of ``X`` outside ``range(U0)`` is
    rank-deficient, QR of the projected matrix returns columns that are not
    orthogonal to ``U0`` (docs/algorithms.md §0). Householder QR of the stacked matrix
    always returns an orthonormal completion ``Q₂``, but where ``X`` adds fewer
    than ``k`` directions some of its columns are arbitrary (a near-zero
    diagonal entry of ``R₂₂ = Q₂ᵀX``). Then, and when ``max_new`` caps the
    count, the new directions are ``Q₂ P`` with ``P`` the left singular vectors
    of ``R₂₂`` above round-off (``max(n, r0 + k)·ε·‖X‖_F``, the usual rank
    tolerance): exactly ``range([U0, X])``, orthogonal to ``U0`` to machine
    precision.

    With the sign fix the first ``r0`` columns equal ``U0`` to round-off; they
    are returned as computed, so every augmentation re-orthonormalizes the basis
    and round-off never accumulates over steps. Callers project the core with
    :func:`galerkin`.

    Args:
        U0: orthonormal basis, ``n×r0``.
        X: directions to add, ``n×k``. Pass the *step* (e.g. ``K₁ − U₀S₀``), not
            ``K₁``: the span is the same and the step is not swamped by the
            ``U₀S₀`` part, which matters in float32.
        max_new: cap on the number of new directions (the dominant ones are
            kept). At most ``min(k, n − r0)`` are ever added.

    Returns:
        ``(Û, A)``: ``Û`` of shape ``n×(r0 + a)`` (the new directions are
        ``Û[:, r0:]``) and ``A = ÛᵀU0`` (``(r0 + a)×r0``), read off the QR
        factor (``[R₁₁; 0]``) instead of multiplied out.
    """
    n, r0 = U0.shape
    k = X.shape[1]
    Q, R = _qr(torch.cat([U0, X.to(U0.dtype)], dim=1))
    dt = U0.dtype
    if Q.shape[1] == r0:
        return Q.to(dt), R[:, :r0].to(dt)
    Q_new, R22 = Q[:, r0:], R[r0:, r0:]
    tol = max(n, r0 + k) * torch.finfo(R.dtype).eps * float(X.norm())
    if (max_new is None or max_new >= R22.shape[0]) and bool((torch.diagonal(R22).abs() > tol).all()):
        return Q.to(dt), R[:, :r0].to(dt)
    with small_lapack(R22):
        P, sigma, _ = torch.linalg.svd(R22, full_matrices=False)
    a = int((sigma > tol).sum())
    if max_new is not None:
        a = min(a, max_new)
    U_hat = torch.cat([Q[:, :r0], Q_new @ P[:, :a]], dim=1)
    A = torch.cat([R[:r0, :r0], R.new_zeros(a, r0)])
    return U_hat.to(dt), A.to(dt)


def galerkin(U1: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, V1: Tensor) -> Tensor:
    """Core of ``U0 S0 V0ᵀ`` in the bases ``(U1, V1)``: ``(U1ᵀU0) S0 (V0ᵀV1)``."""
    return (U1.mT @ U0) @ S0 @ (V0.mT @ V1)


def truncation_rank(
    sigma: Tensor,
    tau: float,
    *,
    absolute: bool = False,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> int:
    """The truncation rule of docs/algorithms.md §1.

    The new rank is the smallest ``k`` with ``‖σ[k:]‖₂ ≤ ϑ``, where
    ``ϑ = τ‖σ‖₂`` (relative, the default) or ``ϑ = τ`` (absolute), clamped to
    ``[min_rank, max_rank]`` and to ``len(σ)``.

    Args:
        sigma: singular values in non-increasing order.
        tau: tolerance, ``>= 0``. ``τ = 0`` keeps every non-zero value.
        absolute: use ``ϑ = τ`` instead of ``τ‖σ‖₂``.
        min_rank: smallest rank returned.
        max_rank: largest rank returned (default: ``len(σ)``).
    """
    _check_tau(tau)
    s = sigma.detach().double()
    full = s.numel()
    # tail[k] = ‖σ[k:]‖₂ for k = 0..full (tail[full] = 0).
    tail = torch.cat([s.flip(0).square().cumsum(0).flip(0), s.new_zeros(1)]).sqrt()
    theta = tau if absolute else tau * float(tail[0])
    k = int(torch.nonzero(tail <= theta)[0])
    hi = full if max_rank is None else min(max_rank, full)
    return max(min(k, hi), min(min_rank, hi))


def _check_tau(tau: float) -> None:
    # NaN passes "tau < 0" and then matches no tail norm (an IndexError); inf keeps rank min_rank silently.
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")


def global_truncation_ranks(
    sigmas: Sequence[Tensor],
    *,
    tau: float | None = None,
    budget: int | None = None,
    absolute: bool = False,
    min_ranks: Sequence[int] | None = None,
    max_ranks: Sequence[int | None] | None = None,
) -> list[int]:
    """Ranks for several layers truncated together (GeoLoRA, docs/algorithms.md §1).

    The singular values of all layers are pooled. With ``tau``, the smallest
    values are dropped while their joint 2-norm stays ``≤ ϑ`` (``ϑ = τ‖σ_all‖₂``,
    or ``τ`` with ``absolute``); values beyond a layer's ``max_rank`` are always
    dropped and count towards that norm, so one layer alone gets its
    :func:`truncation_rank`. With ``budget``, at most ``budget`` values are
    kept in total, the largest first. Every layer keeps at least its
    ``min_rank`` and at most its ``max_rank``.

    Returns:
        One rank per layer, in the order of ``sigmas``.
    """
    if tau is None and budget is None:
        raise ValueError("global truncation needs tau, budget or both")
    L = len(sigmas)
    lo = list(min_ranks) if min_ranks is not None else [1] * L
    hi_in = list(max_ranks) if max_ranks is not None else [None] * L
    hi = [s.numel() if h is None else min(h, s.numel()) for s, h in zip(sigmas, hi_in)]
    lo = [min(a, b) for a, b in zip(lo, hi)]
    if budget is not None and budget < sum(lo):
        raise ValueError(
            f"budget={budget} is below the sum of the layers' min_rank ({sum(lo)}); raise the budget or lower min_rank"
        )
    # Candidates beyond each layer's guaranteed min_rank, within its max_rank.
    vals, owner = [], []
    for i, s in enumerate(sigmas):
        extra = s.detach().double()[lo[i] : hi[i]]
        vals.append(extra)
        owner.append(torch.full((extra.numel(),), i, dtype=torch.long))
    allv = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
    own = torch.cat(owner) if owner else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(allv, descending=True, stable=True)
    allv, own = allv[order], own[order]
    keep = allv.numel()
    if tau is not None:
        _check_tau(tau)
        total = torch.cat([s.detach().double() for s in sigmas]).norm()
        theta = tau if absolute else tau * float(total)
        # Values beyond a layer's max_rank are dropped whatever the threshold; they count
        # towards the dropped norm, as in the per-layer rule (a single layer gets its local rank).
        forced = sum(float(s.detach().double()[h:].square().sum()) for s, h in zip(sigmas, hi))
        tail = (torch.cat([allv.flip(0).square().cumsum(0).flip(0), allv.new_zeros(1)]) + forced).sqrt()
        within = torch.nonzero(tail <= theta)
        keep = int(within[0]) if within.numel() else allv.numel()
    if budget is not None:
        keep = min(keep, budget - sum(lo))
    ranks = list(lo)
    for i in own[:keep].tolist():
        ranks[i] += 1
    return ranks


@dataclass(frozen=True)
class Truncation:
    """Result of truncating a core ``Ŝ = P diag(σ) Qᵀ`` to rank ``r``.

    ``P`` (r̂_u×r) and ``Q`` (r̂_v×r) are the kept singular vectors, so the new
    bases are ``Û P`` and ``V̂ Q``; ``sigma`` holds all singular values.
    """

    P: Tensor
    Q: Tensor
    sigma: Tensor
    rank: int

    @property
    def S(self) -> Tensor:
        return torch.diag(self.sigma[: self.rank])


def svd_truncate(S_hat: Tensor, rank: int | None = None, **rule) -> Truncation:
    """SVD of an augmented core and the kept singular vectors (docs/algorithms.md §1).

    ``torch.linalg.svd`` returns ``Qᴴ``; the right singular vectors are the
    *columns* of ``Q = (Qᴴ)ᵀ``. Taking rows of ``Qᴴ`` instead is the transpose
    bug of several public codes, which changes ``W`` by >100 % even when nothing
    is truncated.

    Args:
        S_hat: core, possibly rectangular.
        rank: the rank to keep; if ``None`` it comes from
            :func:`truncation_rank` with the keyword arguments ``rule``.
    """
    work = S_hat.to(_qr_dtype(S_hat.dtype))
    with small_lapack(work):
        P, sigma, Qh = torch.linalg.svd(work, full_matrices=False)
    if rank is None:
        rank = truncation_rank(sigma, **rule)
    rank = min(rank, sigma.numel())
    dt = S_hat.dtype
    return Truncation(P=P[:, :rank].to(dt), Q=Qh.mT[:, :rank].to(dt), sigma=sigma.to(dt), rank=rank)


def tangent_project(U: Tensor, V: Tensor, M: Tensor) -> Tensor:
    """Dense tangent projection ``P_W(M) = UUᵀM + MVVᵀ − UUᵀMVVᵀ`` (for tests and small layers)."""
    UtM = U.mT @ M
    MV = M @ V
    return U @ UtM + MV @ V.mT - U @ (UtM @ V) @ V.mT


def tangent_transport(
    U0: Tensor,
    V0: Tensor,
    dU: Tensor,
    dS: Tensor,
    dV: Tensor,
    U1: Tensor,
    V1: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Transport a factored tangent vector from ``(U0, V0)`` to ``(U1, V1)`` (docs/algorithms.md §5).

    The vector is ``M = dU V0ᵀ + U0 dS V0ᵀ + U0 dVᵀ``. The result is the factored
    form of the tangent projection ``P_{W1}(M)`` at the new point,
    ``dU1 V1ᵀ + U1 dS1 V1ᵀ + U1 dV1ᵀ`` with ``U1ᵀdU1 = 0`` and ``V1ᵀdV1 = 0``,
    computed in ``O((n + m) r²)`` without forming ``M``.
    """
    A = U1.mT @ U0  # r1×r0
    B = V0.mT @ V1  # r0×r1
    dVtV1 = dV.mT @ V1  # r0×r1
    dUtU1 = dU.mT @ U1  # r0×r1
    dS1 = (U1.mT @ dU) @ B + A @ dS @ B + A @ dVtV1
    MV1 = dU @ B + U0 @ (dS @ B + dVtV1)
    MtU1 = V0 @ (dUtU1 + dS.mT @ A.mT) + dV @ A.mT
    return MV1 - U1 @ dS1, dS1, MtU1 - V1 @ dS1.mT
