"""Reference computations for the tests: dense float64 formulas, independent of dlrt."""

import torch

DT = torch.float64


def ref_orth(A):
    Q, R = torch.linalg.qr(A)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return Q * s


def ref_augment(U0, X):
    """[U0, left singular vectors of the twice-projected complement of X], an independent construction."""
    P = X - U0 @ (U0.T @ X)
    P = P - U0 @ (U0.T @ P)
    L, s, _ = torch.linalg.svd(P, full_matrices=False)
    tol = max(U0.shape[0], U0.shape[1] + X.shape[1]) * torch.finfo(DT).eps * float(X.norm())
    new = L[:, s > tol]
    return ref_orth(torch.cat([U0, new], 1))


def ref_rank(sigma, tau, r_min=1, r_max=None):
    # Smallest k with ||sigma[k:]|| <= tau ||sigma||, clamped.
    total = float(sigma.norm())
    for k in range(sigma.numel() + 1):
        if float(sigma[k:].norm()) <= tau * total:
            break
    r_max = sigma.numel() if r_max is None else min(r_max, sigma.numel())
    return max(min(k, r_max), min(r_min, r_max))


def ref_truncate(U_hat, S_hat, V_hat, tau, r_max=None):
    P, s, Qh = torch.linalg.svd(S_hat)
    r = ref_rank(s, tau, r_max=r_max)
    return U_hat @ P[:, :r], torch.diag(s[:r]), V_hat @ Qh.T[:, :r]


class LeastSquares:
    """loss(W) = ||X Wᵀ − Y||² / (2B) with its dense gradient G(W) = (X Wᵀ − Y)ᵀ X / B."""

    def __init__(self, n, m, B=64, rank=None):
        self.X = torch.randn(B, m, dtype=DT)
        if rank is None:
            Wt = torch.randn(n, m, dtype=DT)
        else:
            Wt = torch.randn(n, rank, dtype=DT) @ torch.randn(rank, m, dtype=DT) / rank**0.5
        self.W_target = Wt
        self.Y = self.X @ Wt.T

    def loss(self, out):
        return 0.5 * ((out - self.Y) ** 2).sum(1).mean()

    def G(self, W):
        return (self.X @ W.T - self.Y).T @ self.X / self.X.shape[0]

    def closure(self, layer, opt):
        def closure():
            opt.zero_grad()
            loss = self.loss(layer(self.X))
            loss.backward()
            return loss

        return closure


def scheduled_lrs(opt, scheduler, steps):
    """The learning rate of ``opt``'s first group at each of ``steps`` steps under ``scheduler``."""
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def mse_closure(model, opt, x, y):
    """A closure for ``opt.step``: zero the gradients, mean squared error of ``model(x)`` against ``y``, backward."""

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    return closure


def ref_gradient_rank_cut(S_hat, M, tau, r_max=None):
    """The gradient rule (docs/algorithms.md §1.2) on a core S_hat with trend M: the kept left/right factors.

    Weight: the leading singular vectors of S_hat by the relative rule. Trend: the fewest leading singular
    directions of M's component outside them, (I - PPᵀ) M (I - QQᵀ), whose dropped tail has norm <= tau ||M||.
    """
    P, s, Qh = torch.linalg.svd(S_hat, full_matrices=False)
    k = ref_rank(s, tau, r_max=r_max)
    PW, QW = P[:, :k], Qh.T[:, :k]
    Mp = M - PW @ (PW.T @ M)
    Mp = Mp - (Mp @ QW) @ QW.T
    A, sa, Bh = torch.linalg.svd(Mp, full_matrices=False)
    room = min(S_hat.shape) - k if r_max is None else min(r_max, min(S_hat.shape)) - k
    a = 0
    while a < room and float(sa[a:].norm()) > tau * float(M.norm()):
        a += 1
    return torch.cat([PW, A[:, :a]], 1), torch.cat([QW, Bh.T[:, :a]], 1)


def ref_gradient_truncate(U_hat, S_hat, V_hat, M, tau, r_max=None):
    P, Q = ref_gradient_rank_cut(S_hat, M, tau, r_max)
    return U_hat @ P, P.T @ S_hat @ Q, V_hat @ Q
