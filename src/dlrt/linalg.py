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
    "augment_basis_qr",
    "count_decompositions",
    "fold",
    "galerkin",
    "global_truncation_ranks",
    "hosvd",
    "mode_product",
    "mode_svd",
    "multi_mode_product",
    "orth",
    "qr",
    "svd_truncate",
    "tangent_project",
    "tangent_transport",
    "truncation_rank",
    "tucker_galerkin",
    "unfold",
]


@dataclass(eq=False)  # counters are told apart by identity (nested blocks)
class DecompositionCount:
    """What :func:`count_decompositions` counted: factorizations of factor matrices, by kind."""

    qr: int = 0
    svd: int = 0


_COUNTERS: list[DecompositionCount] = []


@contextmanager
def count_decompositions() -> Iterator[DecompositionCount]:
    """Count the QR and SVD factorizations this module computes inside the ``with`` block.

    One count per factorization of a factor matrix, whichever algorithm
    computes it: :func:`orth`, :func:`qr` and :func:`augment_basis_qr` count one
    ``qr`` each (Cholesky QR, its rank-revealing fallback or Householder QR
    alike), :func:`svd_truncate` one ``svd``. The fields are read after (or
    during) the block::

        with dlrt.linalg.count_decompositions() as n:
            opt.step(closure)
        print(n.qr, n.svd)

    Blocks may nest; each counts everything inside it.
    """
    count = DecompositionCount()
    _COUNTERS.append(count)
    try:
        yield count
    finally:
        _COUNTERS.remove(count)


def _counted(kind: str) -> None:
    for c in _COUNTERS:
        setattr(c, kind, getattr(c, kind) + 1)


def _qr_dtype(dtype: torch.dtype) -> torch.dtype:
    # LAPACK has no half-precision QR/SVD; factor in float32 and cast back.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


#: Largest basis block (entries of an ``n×2r`` augmented basis) whose algebra a step runs on one CPU
#: thread (:meth:`dlrt.DLRTOptimizer.step`): below it, a second thread gains little on such small
#: products and factorizations, and costs much in barriers when the cores are shared (docs/performance.md).
ONE_THREAD_FACTOR_ENTRIES = 2**16


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op CPU threads; the count before it is restored on exit."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def small_lapack(t: Tensor) -> Iterator[None]:
    """Run the QR/SVD of small factor matrices on one CPU thread.

    Multi-threaded LAPACK on a tall-skinny ``n×2r`` QR or an ``r×r`` SVD spends
    more time in thread barriers than in arithmetic: on 2 cores a 1024×64 QR took
    1 ms on one thread and 5–130 ms on two. The thread count is restored on
    exit; CUDA tensors are unaffected.
    """
    if t.device.type != "cpu":
        yield
        return
    with cpu_threads(1):
        yield


def _qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR with ``diag(R) >= 0``, computed in at least float32."""
    work = A.to(_qr_dtype(A.dtype))
    with small_lapack(work):
        Q, R = torch.linalg.qr(work, mode="reduced")
    d = torch.diagonal(R)
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return Q * sign, R * sign[:, None]


def orth(A: Tensor) -> Tensor:
    """Orthonormal basis of ``range(A)``: the ``Q`` of the reduced QR ``A = QR`` with ``diag(R) >= 0``.

    Column signs are chosen so that ``diag(R) >= 0``, which makes the result
    deterministic across runs and processes (docs/algorithms.md §0). A
    well-conditioned ``A`` takes two Cholesky-QR passes (matrix products, no
    Householder reflections; :func:`_cholesky_qr2`), anything else (rank
    deficient, ill-conditioned, wide, non-finite, or on the CPU at most
    :data:`HOUSEHOLDER_MAX_COLUMNS` columns) Householder QR: both give the
    same ``Q`` up to round-off where both apply.

    Args:
        A: an ``n×k`` matrix.

    Returns:
        ``Q`` of shape ``n×min(n, k)`` with ``QᵀQ = I``.
    """
    return qr(A)[0]


def qr(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR ``A = QR`` with ``diag(R) >= 0``, as :func:`orth` computes it (``Q`` of it is ``orth(A)``).

    Returns ``Q`` (``n×min(n, k)``, orthonormal) and ``R`` (``min(n, k)×k``, upper triangular).
    """
    _counted("qr")
    work = A.to(_qr_dtype(A.dtype))
    n, k = work.shape
    fast = _cholesky_qr2(work) if 0 < k <= n and not _householder_preferred(work, k) else None
    Q, R = fast if fast is not None else _qr(work)
    return Q.to(A.dtype), R.to(A.dtype)


#: Columns up to which a QR on the CPU is LAPACK's Householder QR rather than Cholesky QR. For blocks this
#: narrow the reflections cost less than the Cholesky passes' dozen small products, factorizations and
#: checks (an augmentation 1.2–2.2× faster at 8 to 16 columns for 256 to 4096 rows, one thread); from 32
#: columns on the two are even (benchmarks/qr_paths.py, docs/performance.md). On a GPU every block takes
#: Cholesky QR.
HOUSEHOLDER_MAX_COLUMNS = 16


def _householder_preferred(A: Tensor, columns: int) -> bool:
    """Whether a QR of ``columns`` columns on ``A``'s device is Householder QR (:data:`HOUSEHOLDER_MAX_COLUMNS`)."""
    return A.device.type == "cpu" and columns <= HOUSEHOLDER_MAX_COLUMNS


#: Largest ``‖YᵀY − I‖_F`` a second Cholesky-QR pass accepts: below it ``κ(Y)² ≤ 3``, so the
#: pass leaves ``Q`` orthonormal to a small multiple of the unit round-off.
_SECOND_PASS_GRAM_ERROR = 0.5


def _cholesky_pass(Y: Tensor, *, near_orthonormal: bool, tol: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """One Cholesky-QR pass ``Y = Q R`` (``R`` the Cholesky factor of ``YᵀY``), or ``None`` where it is unreliable.

    Fails when the Gram matrix is not numerically positive definite (a
    rank-deficient or too ill-conditioned ``Y``, or non-finite values), when a
    diagonal entry of ``R`` is at most ``tol``, and, with ``near_orthonormal``,
    when ``‖YᵀY − I‖_F`` exceeds :data:`_SECOND_PASS_GRAM_ERROR` (non-finite
    values fail this too). The products run on every thread, the small
    Cholesky and triangular inverse on one (:func:`small_lapack`); the checks
    cost one host sync.
    """
    G = Y.mT @ Y
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    with small_lapack(G):
        L, info = torch.linalg.cholesky_ex(G)
        R = L.mT
        R_inv = torch.linalg.solve_triangular(R, eye, upper=True)
    ok = info == 0
    if near_orthonormal:
        ok = ok & (torch.linalg.matrix_norm(G - eye) <= _SECOND_PASS_GRAM_ERROR)
    if tol is not None:
        ok = ok & (torch.diagonal(R) > tol).all()
    if not bool(ok):
        return None
    return Y @ R_inv, R


def _cholesky_qr2(A: Tensor) -> tuple[Tensor, Tensor] | None:
    """Reduced QR ``A = QR`` of a tall, well-conditioned ``A`` by CholeskyQR2 (Fukaya et al. 2014).

    The first pass leaves ``Q₁`` orthonormal to ``O(κ(A)² ε)``; the second
    starts from an almost orthonormal matrix and brings that to ``O(ε)``. It is
    all matrix products (BLAS-3), against the BLAS-2 panels of Householder QR.
    ``None`` when a pass is unreliable (:func:`_cholesky_pass`): the caller
    falls back to Householder.
    """
    first = _cholesky_pass(A, near_orthonormal=False)
    if first is None:
        return None
    Q1, R1 = first
    second = _cholesky_pass(Q1, near_orthonormal=True)
    if second is None:
        return None
    Q, R2 = second
    return Q, R2 @ R1


def _spectral_pass(X1: Tensor, tol: Tensor, max_new: int | None) -> tuple[Tensor, Tensor] | None:
    """``X₁ ≈ Q₁ T₁`` with ``Q₁`` the left singular vectors of ``X₁`` above ``tol`` (at most ``max_new``), or ``None``.

    The rank-revealing first pass for a complement that Cholesky QR refuses
    (numerically rank deficient, or ill-conditioned), from the eigendecomposition
    of the Gram matrix ``X₁ᵀX₁ = Z Λ Zᵀ`` in float64: ``Q₁ = X₁ Z Λ^{-1/2}``, ``T₁ = Λ^{1/2} Zᵀ``
    over the kept values. In float64 the Gram matrix resolves singular values
    down to about ``√(k ε₆₄)·σ_max``, far below float32's rank tolerance. ``None``
    where that does not separate them from the tolerance (float64 inputs, whose
    tolerance is far smaller) or for non-finite input: the caller then takes
    Householder QR.
    """
    k = X1.shape[1]
    Xd = X1.double()
    G = Xd.mT @ Xd
    if not bool(torch.isfinite(G).all()):
        return None  # Householder QR reports it
    with small_lapack(G):
        lam, Z = torch.linalg.eigh(G)  # ascending
    sigma, Z = lam.flip(0).clamp_min(0).sqrt(), Z.flip(1)
    resolved = 10 * math.sqrt(k * torch.finfo(torch.float64).eps) * sigma[0]
    keep = sigma > tol
    if bool((keep & (sigma <= resolved)).any()):
        return None
    a = int(keep.sum())
    if max_new is not None:
        a = min(a, max_new)
    sigma, Z = sigma[:a], Z[:, :a]
    # Sign rule: each singular vector's largest entry in Z is positive (deterministic, like diag(R) >= 0).
    Z = Z * torch.sign(Z.gather(0, Z.abs().argmax(0, keepdim=True)))
    Q1 = (Xd @ (Z / sigma)).to(X1.dtype)
    return Q1, (sigma[:, None] * Z.mT).to(X1.dtype)


def _augment_fast(U0: Tensor, X: Tensor, tol: Tensor, max_new: int | None) -> tuple[Tensor, Tensor] | None:
    """:func:`augment_basis_qr` in matrix products, without Householder QR; ``None`` where that is unreliable.

    Only the new directions are orthogonalized: ``X₁ = X − U0(U0ᵀX)`` and a first
    pass ``X₁ ≈ Q₁T₁``: Cholesky QR (``T₁ = R₁``) when every new direction is well
    above the rank tolerance ``tol`` and the Gram matrix is well conditioned,
    otherwise (or with ``max_new`` below ``k``) the rank-revealing
    :func:`_spectral_pass`, which keeps the left singular vectors above ``tol``.
    A second pass over all of ``Y = [U0, Q₁]`` then removes what round-off left
    of ``U0`` in ``Q₁``, the loss of orthogonality of ``Q₁`` and that of ``U0``
    itself (so it never accumulates over steps). With ``Y = Û R₂`` and
    ``[U0, X] ≈ Y [[I, U0ᵀX], [0, T₁]]`` (exact but for directions below
    ``tol``), ``Ûᵀ[U0, X] = R₂ [[I, U0ᵀX], [0, T₁]]``.
    """
    r0, k = U0.shape[1], X.shape[1]
    C = U0.mT @ X
    X1 = torch.addmm(X, U0, C, alpha=-1)
    first = _cholesky_pass(X1, near_orthonormal=False, tol=tol) if max_new is None or max_new >= k else None
    if first is None:
        first = _spectral_pass(X1, tol, max_new)
        if first is None:
            return None
    Q1, T1 = first
    second = _cholesky_pass(torch.cat([U0, Q1], dim=1), near_orthonormal=True)
    if second is None:
        return None
    U_hat, R2 = second
    left = R2[:, :r0]  # R₂ [I; 0]
    return U_hat, torch.cat([left, torch.addmm(R2[:, r0:] @ T1, left, C)], dim=1)


def augment_basis(U0: Tensor, X: Tensor, max_new: int | None = None) -> Tensor:
    """See :func:`augment_basis_qr`; returns only ``Û``."""
    return augment_basis_qr(U0, X, max_new)[0]


def augment_basis_qr(U0: Tensor, X: Tensor, max_new: int | None = None) -> tuple[Tensor, Tensor]:
    """Orthonormal basis ``Û`` of ``range([U0, X])`` whose first columns span ``U0``, and ``R = Ûᵀ[U0, X]``.

    Never built by appending ``orth((I − U0U0ᵀ) X)``: when the part of ``X``
    outside ``range(U0)`` is rank-deficient, QR of the projected matrix returns
    columns that are not orthogonal to ``U0`` (docs/algorithms.md §0).

    Where ``r0 + k ≤ n`` (every layer but the smallest) and the block is wider
    than :data:`HOUSEHOLDER_MAX_COLUMNS` or not on the CPU, :func:`_augment_fast`
    orthogonalizes only the ``k`` new directions, in a handful of matrix
    products: by Cholesky QR when they are well conditioned, else from the
    singular vectors of the complement above the rank tolerance. Otherwise (and
    where that cannot resolve the tolerance: ill-conditioned float64 input) the basis comes from
    Householder QR of the stacked ``[U0, X] = [Q₁, Q₂] R``, which always returns
    an orthonormal completion ``Q₂``; where ``X`` adds fewer than ``k``
    directions some of its columns are arbitrary (a near-zero diagonal entry of
    ``R₂₂ = Q₂ᵀX``). Then, and when ``max_new`` caps the count, the new
    directions are ``Q₂ P`` with ``P`` the left singular vectors of ``R₂₂`` above
    round-off (``max(n, r0 + k)·ε·‖X‖_F``, the usual rank tolerance): exactly
    ``range([U0, X])``, orthogonal to ``U0`` to machine precision.

    The first ``r0`` columns equal ``U0`` to round-off (the sign fix makes
    ``diag(R) ≥ 0``); they are returned as computed, so every augmentation
    re-orthonormalizes the basis and round-off never accumulates over steps.

    Args:
        U0: orthonormal basis, ``n×r0``.
        X: directions to add, ``n×k``. Pass the *step* (e.g. ``K₁ − U₀S₀``), not
            ``K₁``: the span is the same and the step is not swamped by the
            ``U₀S₀`` part, which matters in float32.
        max_new: cap on the number of new directions (the dominant ones are
            kept). At most ``min(k, n − r0)`` are ever added.

    Returns:
        ``(Û, R)``: ``Û`` of shape ``n×(r0 + a)`` (the new directions are
        ``Û[:, r0:]``) and ``R = Ûᵀ[U0, X]`` (``(r0 + a)×(r0 + k)``), read off
        the factorization instead of multiplied out: ``R[:, :r0] = ÛᵀU0`` (the
        Galerkin projection of §0) and ``R[r0:, r0:] = Ûᵀ[:, r0:] X``.
    """
    _counted("qr")
    n, r0 = U0.shape
    k = X.shape[1]
    dt = U0.dtype
    work = U0.to(_qr_dtype(dt))
    Xw = X.to(work.dtype)
    tol = max(n, r0 + k) * torch.finfo(work.dtype).eps * torch.linalg.vector_norm(Xw)
    if 0 < k and r0 + k <= n and not _householder_preferred(work, r0 + k):
        fast = _augment_fast(work, Xw, tol, max_new)
        if fast is not None:
            return fast[0].to(dt), fast[1].to(dt)
    tol = float(tol)
    Q, R = _qr(torch.cat([work, Xw], dim=1))
    if Q.shape[1] == r0:
        return Q.to(dt), R.to(dt)
    Q_new, R22 = Q[:, r0:], R[r0:, r0:]
    if (max_new is None or max_new >= R22.shape[0]) and bool((torch.diagonal(R22).abs() > tol).all()):
        return Q.to(dt), R.to(dt)
    with small_lapack(R22):
        P, sigma, _ = torch.linalg.svd(R22, full_matrices=False)
    a = int((sigma > tol).sum())
    if max_new is not None:
        a = min(a, max_new)
    P = P[:, :a]
    U_hat = torch.cat([Q[:, :r0], Q_new @ P], dim=1)
    R_hat = torch.cat([R[:r0], torch.cat([R.new_zeros(a, r0), P.mT @ R22], dim=1)])
    return U_hat.to(dt), R_hat.to(dt)


def galerkin(U1: Tensor, U0: Tensor, S0: Tensor, V0: Tensor, V1: Tensor) -> Tensor:
    """Core of ``U0 S0 V0ᵀ`` in the bases ``(U1, V1)``: ``(U1ᵀU0) S0 (V0ᵀV1)``.

    The 2-mode case of :func:`tucker_galerkin` (``S0 ×₀ U1ᵀU0 ×₁ V1ᵀV0``), written as two products.
    """
    return (U1.mT @ U0) @ S0 @ (V0.mT @ V1)


def tucker_galerkin(new: Sequence[Tensor], old: Sequence[Tensor], C0: Tensor) -> Tensor:
    """Core of the Tucker tensor ``C0 ×ᵢ old_i`` in the bases ``new``: ``C0 ×ᵢ (new_iᵀ old_i)``."""
    return multi_mode_product(C0, [N.mT @ O for N, O in zip(new, old)])


#: The rank rules, by name (docs/algorithms.md §1); the first is the default.
TAU_MODES = ("gradient", "relative", "absolute")


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
    # A core has at most a few hundred singular values: one transfer, then plain floats
    # (Python floats are float64), instead of a dozen tiny tensor operations.
    s = sigma.detach().double().tolist()
    full = len(s)
    # tail[k] = ‖σ[k:]‖₂ for k = 0..full (tail[full] = 0).
    tail = [0.0] * (full + 1)
    for i in range(full - 1, -1, -1):
        tail[i] = tail[i + 1] + s[i] * s[i]
    tail = [math.sqrt(t) for t in tail]
    theta = tau if absolute else tau * tail[0]
    k = next(i for i, t in enumerate(tail) if t <= theta)
    hi = full if max_rank is None else min(max_rank, full)
    return max(min(k, hi), min(min_rank, hi))


def normal_directions(
    P: Tensor, Q: Tensor | None, M: Tensor, tau: float, max_new: int, C: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The directions the gradient rule adds to a truncation (docs/algorithms.md §1).

    ``P`` (and ``Q``) are the orthonormal left (and right) singular vectors the
    weight keeps, ``M`` the gradient trend in the same coordinates. The part of
    ``M`` no rotation of the kept bases can represent is its normal component
    ``M⊥ = (I − PPᵀ) M (I − QQᵀ)`` (one-sided ``(I − PPᵀ) M`` when ``Q`` is
    ``None``, a Tucker mode). Returns its leading ``a`` left (and right) singular
    vectors, the fewest with ``‖σ(M⊥)[a:]‖₂ ≤ τ‖M‖_F``, at most ``max_new``;
    they are orthogonal to ``P`` (and ``Q``). The third result holds their
    singular values relative to ``‖M‖_F`` (for a budget shared by several layers).

    With the core ``C`` (in the same coordinates) given, the part of ``M⊥`` along
    the weight being dropped, ``C⊥``, is left out when the trend shrinks it
    (``⟨M⊥, C⊥⟩ > 0``): the loss pushes those directions towards zero, not outwards.
    And directions in which ``C`` holds nothing above round-off are not added: at a
    stationary point the trend is itself round-off, and its normal part no
    direction of the weight.
    """
    _check_tau(tau)

    def normal(X: Tensor) -> Tensor:
        X = X.to(P.dtype)
        X = X - P @ (P.mT @ X)
        return X if Q is None else X - (X @ Q) @ Q.mT

    Mp = normal(M)
    total = float(M.norm())
    if C is not None:
        # The weight the truncation drops, T⊥, lies in the same normal space. Where the trend points along it
        # (−M shrinks it: a direction being given up, as at the end of a convergence), dropping it moves with
        # the flow: that part of M⊥ asks for no rank.
        T = normal(C)
        tt = float((T * T).sum())
        alpha = float((Mp * T).sum()) / tt if tt > 0 else 0.0
        if alpha > 0:
            Mp = Mp - alpha * T
    empty_q = None if Q is None else Q[:, :0]
    if max_new <= 0 or total == 0.0 or not math.isfinite(total):
        return P[:, :0], empty_q, P.new_zeros(0)
    _counted("svd")
    work = Mp.to(_qr_dtype(Mp.dtype))
    with small_lapack(work):
        A, sigma, Bh = torch.linalg.svd(work, full_matrices=False)
    # Singular values at round-off have arbitrary vectors (not even orthogonal to P): never directions.
    floor = 8 * torch.finfo(work.dtype).eps * max(work.shape) * total
    a = min(truncation_rank(sigma, tau * total, absolute=True, min_rank=0), max_new, int((sigma > floor).sum()))
    A = A[:, :a].to(P.dtype)
    # Re-project once: the kept columns are orthogonal to P (and Q) to round-off, and stay so.
    A = orth(A - P @ (P.mT @ A)) if a else A
    if a and C is not None:
        part = A.mT @ C.to(A.dtype)
        if Q is not None:
            part = part @ Bh.mT[:, :a].to(A.dtype)
        if float(part.norm()) <= 8 * torch.finfo(C.dtype).eps * float(C.norm()) * max(C.shape):
            a, A = 0, A[:, :0]
    share = (sigma[:a] / total).to(P.dtype)
    if Q is None:
        return A, None, share
    B = Bh.mT[:, :a].to(Q.dtype)
    B = orth(B - Q @ (Q.mT @ B)) if a else B
    return A, B, share


#: The orders in which a global budget takes the pooled values (:func:`global_truncation_ranks`): by ``σ``
#: (GeoLoRA's), or by ``σ²`` per unit of the budget they cost.
BUDGET_ORDERS = ("sigma", "energy")


def check_tau(tau: float, tau_mode: str, name: str = "tau") -> float:
    """``tau`` as a float, checked for ``tau_mode`` (one of :data:`TAU_MODES`); a clear ``ValueError`` otherwise.

    A relative tolerance (``"gradient"``, ``"relative"``) is a share of a norm, in
    ``[0, 1)``: ``τ ≥ 1`` would let every singular value go and cut each layer to
    its ``min_rank``. ``name`` is the parameter's name in the messages.
    """
    if tau_mode not in TAU_MODES:
        raise ValueError(f"tau_mode must be one of {TAU_MODES}, got {tau_mode!r}")
    _check_tau(tau, name)
    if tau_mode != "absolute" and tau >= 1:
        raise ValueError(
            f"{name}={tau!r} is a relative tolerance (tau_mode={tau_mode!r}), a share of the norm in [0, 1): "
            f"values >= 1 truncate every layer to min_rank; use e.g. {name}=0.1, or tau_mode='absolute'"
        )
    return float(tau)


def _check_tau(tau: float, name: str = "tau") -> None:
    # NaN passes "tau < 0" and then matches no tail norm (an IndexError); inf keeps rank min_rank silently.
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={tau!r}")


def global_truncation_ranks(
    sigmas: Sequence[Tensor],
    *,
    tau: float | None = None,
    budget: int | None = None,
    absolute: bool = False,
    min_ranks: Sequence[int] | None = None,
    max_ranks: Sequence[int | None] | None = None,
    costs: Sequence[Sequence[float] | Tensor] | None = None,
    order: str = "sigma",
) -> list[int]:
    """Ranks for several layers truncated together (GeoLoRA, docs/algorithms.md §1).

    The singular values of all layers are pooled. With ``tau``, the smallest
    values are dropped while their joint 2-norm stays ``≤ ϑ`` (``ϑ = τ‖σ_all‖₂``,
    or ``τ`` with ``absolute``); values beyond a layer's ``max_rank`` are always
    dropped and count towards that norm, so one layer alone gets its
    :func:`truncation_rank`. With ``budget``, at most ``budget`` values are
    kept in total, the largest first. Every layer keeps at least its
    ``min_rank`` and at most its ``max_rank``.

    ``costs`` prices the ranks against the ``budget`` (default: each rank costs
    1, the budget is a total rank): ``costs[i][k]`` is what layer ``i``'s
    ``(k+1)``-th rank costs, for ``k < max_rank`` (a layer's ranks are
    bought in order, so the price may grow with the rank). The floors are paid
    first; then the pooled values are taken, the largest first, until the next
    one's cost no longer fits in what is left of the budget. ``order="energy"``
    takes them by ``σ²/cost`` instead (the energy a unit of the budget buys;
    with ``tau`` among the values ``tau`` keeps), the largest first, with the
    same stop; without ``costs`` that is the order of ``σ``.

    Returns:
        One rank per layer, in the order of ``sigmas``.
    """
    if tau is None and budget is None:
        raise ValueError("global truncation needs tau, budget or both")
    if order not in BUDGET_ORDERS:
        raise ValueError(f"order must be one of {BUDGET_ORDERS}, got {order!r}")
    L = len(sigmas)
    lo = list(min_ranks) if min_ranks is not None else [1] * L
    hi_in = list(max_ranks) if max_ranks is not None else [None] * L
    hi = [s.numel() if h is None else min(h, s.numel()) for s, h in zip(sigmas, hi_in)]
    lo = [min(a, b) for a, b in zip(lo, hi)]
    if costs is not None:
        if budget is None:
            raise ValueError("costs= price the ranks against a budget: give budget= too")
        price = [torch.as_tensor(c, dtype=torch.float64).flatten().cpu() for c in costs]
        if len(price) != L or any(p.numel() < h for p, h in zip(price, hi)):
            raise ValueError("costs= needs one cost per rank up to each layer's max_rank, for every layer")
    else:
        price = [torch.ones(h, dtype=torch.float64) for h in hi]
    if budget is not None:
        floor = sum(float(p[:a].sum()) for p, a in zip(price, lo))
        if budget < floor:
            if costs is None:
                raise ValueError(
                    f"budget={budget} is below the sum of the layers' min_rank ({sum(lo)}); "
                    "raise the budget or lower min_rank"
                )
            raise ValueError(
                f"budget={budget} is below what the layers' min_rank cost ({floor:g}); raise the budget or lower "
                "min_rank (this budget counts parameters, budget_unit='params'; a total rank is budget_unit='rank')"
            )
    # The decision is made on the CPU (a few values per layer), where the owners and prices are.
    sigmas = [s.detach().double().cpu() for s in sigmas]
    # Candidates beyond each layer's guaranteed min_rank, within its max_rank.
    vals, owner, cost = [], [], []
    for i, s in enumerate(sigmas):
        extra = s[lo[i] : hi[i]]
        vals.append(extra)
        owner.append(torch.full((extra.numel(),), i, dtype=torch.long))
        cost.append(price[i][lo[i] : hi[i]])
    allv = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
    own = torch.cat(owner) if owner else torch.zeros(0, dtype=torch.long)
    allc = torch.cat(cost) if cost else torch.zeros(0, dtype=torch.float64)
    perm = torch.argsort(allv, descending=True, stable=True)
    allv, own, allc = allv[perm], own[perm], allc[perm]
    keep = allv.numel()
    if tau is not None:
        _check_tau(tau)
        total = torch.cat(sigmas).norm()
        theta = tau if absolute else tau * float(total)
        # Values beyond a layer's max_rank are dropped whatever the threshold; they count
        # towards the dropped norm, as in the per-layer rule (a single layer gets its local rank).
        forced = sum(float(s[h:].square().sum()) for s, h in zip(sigmas, hi))
        tail = (torch.cat([allv.flip(0).square().cumsum(0).flip(0), allv.new_zeros(1)]) + forced).sqrt()
        within = torch.nonzero(tail <= theta)
        keep = int(within[0]) if within.numel() else allv.numel()
    own = own[:keep]
    if budget is not None:
        if order == "energy":
            # σ and each layer's prices are sorted, so σ²/cost is too: a layer still buys its ranks in order.
            by = torch.argsort(allv[:keep].square() / allc[:keep], descending=True, stable=True)
            own, allc = own[by], allc[:keep][by]
        own = own[: affordable(allc[: own.numel()], budget - floor)]
    ranks = list(lo)
    for i in own.tolist():
        ranks[i] += 1
    return ranks


def affordable(costs: Tensor, room: float) -> int:
    """How many of ``costs``, taken in order, fit in ``room``: the longest prefix whose sum is ``≤ room``."""
    if costs.numel() == 0:
        return 0
    # Integer prices (ranks, parameters) are summed exactly in float64 up to 2**53.
    return int((costs.double().cumsum(0) <= room).sum())


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
    _counted("svd")
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
    K: Tensor,
    L: Tensor,
    S: Tensor,
    U1: Tensor,
    V1: Tensor,
    A: Tensor | None = None,
    B: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Project a factored tangent vector at ``(U0, V0)`` onto the tangent space at ``(U1, V1)`` (docs/algorithms.md §9).

    A tangent vector ``ξ`` at ``W = U0 S0 V0ᵀ`` is kept as its three projections
    ``K = ξV0`` (n×r0_v), ``L = ξᵀU0`` (m×r0_u) and ``S = U0ᵀξV0``: then
    ``ξ = K V0ᵀ + U0 Lᵀ − U0 S V0ᵀ``. Returns the same three projections of
    ``P₁(ξ)``, the tangent projection at the new bases, ``(ξV1, ξᵀU1, U1ᵀξV1)``,
    in ``O((n + m) r0 r1)`` without forming ``ξ``. ``A = U1ᵀU0`` and
    ``B = V0ᵀV1`` are computed unless given.
    """
    A = U1.mT @ U0 if A is None else A  # r1_u×r0_u
    B = V0.mT @ V1 if B is None else B  # r0_v×r1_v
    CV = L.mT @ V1  # U0ᵀ ξ V1, r0_u×r1_v
    CU = K.mT @ U1  # (U1ᵀ ξ V0)ᵀ, r0_v×r1_u
    SB = S @ B
    K1 = torch.addmm(K @ B, U0, CV - SB)  # ξV1 = K B + U0 (LᵀV1 − S B)
    L1 = torch.addmm(L @ A.mT, V0, CU - S.mT @ A.mT)  # ξᵀU1 = L Aᵀ + V0 (KᵀU1 − Sᵀ Aᵀ)
    S1 = CU.mT @ B + A @ (CV - SB)  # U1ᵀξV1
    return K1, L1, S1


# ----------------------------------------------------------------------------- N-mode (Tucker) operations
# A matrix W = U S Vᵀ is the 2-mode case of a Tucker tensor W = C ×₀ U₀ ×₁ U₁ … with orthonormal
# mode bases U_i: S = C, U = U₀, V = U₁. The functions below work for any number of modes.


def unfold(T: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding ``Mat_i(T)``: ``n_i × Π_{j≠i} n_j``, the other modes in their order (row-major)."""
    return T.movedim(mode, 0).reshape(T.shape[mode], -1)


def fold(M: Tensor, mode: int, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`unfold`: the tensor of ``shape`` whose mode-``mode`` unfolding is ``M``."""
    rest = [s for j, s in enumerate(shape) if j != mode]
    return M.reshape(M.shape[0], *rest).movedim(0, mode)


def mode_product(T: Tensor, M: Tensor, mode: int) -> Tensor:
    """``T ×_mode M``: multiply mode ``mode`` of ``T`` (size ``k``) by the ``n×k`` matrix ``M``."""
    return torch.tensordot(M, T, dims=([1], [mode])).movedim(0, mode)


def multi_mode_product(T: Tensor, mats: Sequence[Tensor | None]) -> Tensor:
    """``T ×₀ M₀ ×₁ M₁ …``; a ``None`` leaves its mode as it is."""
    for mode, M in enumerate(mats):
        if M is not None:
            T = mode_product(T, M, mode)
    return T


def mode_svd(C: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """Left singular vectors and singular values of ``Mat_mode(C)`` (all of them, non-increasing)."""
    _counted("svd")
    work = unfold(C, mode).to(_qr_dtype(C.dtype))
    with small_lapack(work):
        P, sigma, _ = torch.linalg.svd(work, full_matrices=False)
    return P.to(C.dtype), sigma.to(C.dtype)


def hosvd(
    T: Tensor,
    ranks: Sequence[int | None] | None = None,
    *,
    tau: float | None = None,
    min_ranks: Sequence[int] | None = None,
    max_ranks: Sequence[int | None] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Truncated higher-order SVD: ``T ≈ C ×₀ U₀ ×₁ U₁ …`` with orthonormal ``U_i``.

    Each ``U_i`` holds the leading left singular vectors of ``Mat_i(T)``; the
    core is ``C = T ×₀ U₀ᵀ ×₁ U₁ᵀ …``. Per mode the rank is ``ranks[i]``, or
    with ``tau`` the :func:`truncation_rank` of that unfolding's singular values
    (relative), capped by ``ranks[i]`` and ``max_ranks[i]`` and at least
    ``min_ranks[i]``. At full ranks it reproduces ``T`` to round-off.

    Returns:
        ``(C, [U₀, U₁, …])``.
    """
    d = T.dim()
    ranks = [None] * d if ranks is None else list(ranks)
    lo = [1] * d if min_ranks is None else list(min_ranks)
    hi = [None] * d if max_ranks is None else list(max_ranks)
    if len(ranks) != d or len(lo) != d or len(hi) != d:
        raise ValueError(f"hosvd of a {d}-way tensor needs {d} ranks, got {ranks}")
    bases = []
    for i in range(d):
        P, sigma = mode_svd(T, i)
        cap = [c for c in (ranks[i], hi[i]) if c is not None]
        cap = min(cap) if cap else sigma.numel()
        if tau is not None:
            r = truncation_rank(sigma, tau, min_rank=lo[i], max_rank=cap)
        else:
            r = min(cap, sigma.numel())
        bases.append(P[:, :r])
    return multi_mode_product(T, [U.mT for U in bases]), bases
