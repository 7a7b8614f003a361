"""dlrt.kinetic: quadratures, the entropy closure, the ICNN, the M_N solver, `dlrt closure` (float64)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from dlrt.kinetic import (
    ICNN,
    NetworkClosure,
    NewtonClosure,
    alpha0,
    gauss_legendre,
    make_basis,
    moments,
    newton,
    normalize,
    periodic_case,
    predict,
    sample,
    scale_back,
    solve,
    sphere_quadrature,
)

F64 = torch.float64


def _sphere_monomial_integral(a: int, b: int, c: int) -> float:
    """∫_{S²} x^a y^b z^c dΩ (Folland's formula)."""
    if a % 2 or b % 2 or c % 2:
        return 0.0
    beta = [(k + 1) / 2 for k in (a, b, c)]
    return 2 * math.prod(math.gamma(x) for x in beta) / math.gamma(sum(beta))


def test_quadratures_integrate_the_basis_exactly_to_their_order():
    # 1D: the n-point Gauss–Legendre rule is exact for μ^k, k <= 2n − 1, and not for k = 2n
    n = 5
    mu, w = gauss_legendre(n)
    for k in range(2 * n):
        exact = 2 / (k + 1) if k % 2 == 0 else 0.0
        assert float((w * mu**k).sum()) == pytest.approx(exact, abs=1e-14)
    assert abs(float((w * mu ** (2 * n)).sum()) - 2 / (2 * n + 1)) > 1e-6
    # the M4 basis and the products in its Hessian (degree <= 8)
    basis = make_basis("monomial", 4, 1, quadrature=5)
    gram = (basis.m * basis.w[:, None]).mT @ basis.m
    exact = torch.tensor(
        [[2 / (i + j + 1) if (i + j) % 2 == 0 else 0.0 for j in range(5)] for i in range(5)], dtype=F64
    )
    torch.testing.assert_close(gram, exact, atol=1e-14, rtol=0)
    # sphere: product rule exact for monomials x^a y^b z^c of degree <= 2 n_mu − 1
    v, w = sphere_quadrature(4)
    assert float(w.sum()) == pytest.approx(4 * math.pi, abs=1e-13)
    for a in range(5):
        for b in range(5 - a):
            for c in range(8 - a - b):
                value = float((w * v[:, 0] ** a * v[:, 1] ** b * v[:, 2] ** c).sum())
                assert value == pytest.approx(_sphere_monomial_integral(a, b, c), abs=1e-13), (a, b, c)
    # real spherical harmonics of degree <= 3: orthonormal under their quadrature; monomials: (N + 1)² of them
    for order in (1, 2, 3):
        Y = make_basis("harmonic", order, 3)
        torch.testing.assert_close(
            (Y.m * Y.w[:, None]).mT @ Y.m, torch.eye((order + 1) ** 2, dtype=F64), atol=1e-13, rtol=0
        )
        M = make_basis("monomial", order, 3)
        assert M.n == (order + 1) ** 2
        for j, (a, b, c) in enumerate(_exponents(M, order)):
            assert float(M.w @ M.m[:, j]) == pytest.approx(_sphere_monomial_integral(a, b, c), abs=1e-13)


def _exponents(basis, order):
    from dlrt.kinetic.basis import _monomial_exponents

    return _monomial_exponents(order)


@pytest.mark.parametrize(
    ("kind", "order", "dim"), [("monomial", 2, 1), ("monomial", 4, 1), ("harmonic", 2, 3), ("monomial", 2, 3)]
)
def test_newton_satisfies_the_moment_equations(kind, order, dim):
    basis = make_basis(kind, order, dim)
    gen = torch.Generator().manual_seed(1)
    # moments of positive densities that are *not* of the exponential family: realizable, and Newton must find α
    B = 64
    v = basis.v
    coef = torch.rand(B, 3, generator=gen, dtype=F64)
    proj = v[:, :1] if dim == 1 else v @ torch.tensor([0.3, -0.5, 0.8], dtype=F64)[:, None]
    f = 0.2 + coef[:, :1] * torch.exp(3 * coef[:, 1:2] * proj.mT) + coef[:, 2:] * (1 + torch.sin(4 * proj.mT))
    u = (f * basis.w) @ basis.m * (1 + 4 * torch.rand(B, 1, generator=gen, dtype=F64))
    res = newton(u, basis)
    residual = (moments(res.alpha, basis) - u).norm(dim=-1) / u.norm(dim=-1)
    assert float(residual.max()) <= 1e-10
    # the scaling relation: the closure of u / u₀ scaled back is the closure of u
    u_hat, u0 = normalize(u)
    hat = newton(u_hat, basis)
    alpha, h = scale_back(hat.alpha, hat.h, u0, basis)
    torch.testing.assert_close(alpha, res.alpha, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(h, res.h, atol=1e-9, rtol=1e-9)


def _icnn(n_in: int = 2, width: int = 12, depth: int = 3) -> ICNN:
    torch.manual_seed(3)
    net = ICNN(n_in, width, depth).to(F64)
    with torch.no_grad():  # arbitrary signs everywhere: the forward pass must keep h convex regardless
        for p in net.parameters():
            p.normal_(0, 1)
    return net


def test_icnn_is_convex():
    net = _icnn()
    gen = torch.Generator().manual_seed(0)
    for x in torch.randn(8, 2, generator=gen, dtype=F64):
        H = torch.autograd.functional.hessian(lambda z: net(z[None])[0], x)
        assert float(torch.linalg.eigvalsh(H)[0]) >= -1e-12
    a, b = torch.randn(2, 50, 2, generator=gen, dtype=F64)
    for t in torch.linspace(0.05, 0.95, 7, dtype=F64):
        left = net((1 - t) * a + t * b)
        assert bool((left <= (1 - t) * net(a) + t * net(b) + 1e-12).all())
    # the same weights without the non-negativity (the z-path taken as stored) are not convex: the check has teeth
    plain = _icnn()
    for lin in plain.z:
        lin.weight.data.neg_()

    def unconstrained(x):
        xs = plain.scaled(x)
        z = torch.nn.functional.softplus(plain.first(xs))
        for lz, lx in zip(plain.z, plain.x):
            z = torch.nn.functional.softplus(-torch.nn.functional.linear(z, lz.weight.abs()) + lx(xs))
        return (torch.nn.functional.linear(z, plain.out_z.weight.abs()) + plain.out_x(xs))[..., 0]

    gaps = [unconstrained((1 - t) * a + t * b) - (1 - t) * unconstrained(a) - t * unconstrained(b) for t in (0.25, 0.5)]
    assert max(float(g.detach().max()) for g in gaps) > 1e-6


def test_alpha_is_the_gradient_of_h():
    net = _icnn()
    basis = make_basis("monomial", 2, 1)
    gen = torch.Generator().manual_seed(5)
    ar = (torch.rand(20, 2, generator=gen, dtype=F64) * 2 - 1) * 3
    u = moments(torch.cat([alpha0(ar, basis)[:, None], ar], 1), basis)
    h, alpha, u_rec = predict(net, u, basis)
    eps = 1e-6
    for k in range(2):
        e = torch.zeros(2, dtype=F64)
        e[k] = eps
        fd = (net(u[:, 1:] + e) - net(u[:, 1:] - e)) / (2 * eps)
        torch.testing.assert_close(alpha[:, k + 1], fd, atol=1e-7, rtol=1e-7)
    # α₀ completes the normalisation: the reconstructed u has u₀ = 1
    torch.testing.assert_close(u_rec[:, 0], torch.ones(20, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(h, net(u[:, 1:]).detach())


def test_regularized_closure_tends_to_the_unregularized_one():
    basis = make_basis("monomial", 3, 1)
    data = sample(basis, 32, bound=3.0, min_eig=1e-3, seed=2)
    exact = newton(data.u, basis).alpha
    torch.testing.assert_close(exact, data.alpha, atol=1e-8, rtol=0)
    errors = []
    for gamma in (1e-3, 1e-4, 1e-5, 1e-6):
        reg = newton(data.u, basis, gamma)
        residual = moments(reg.alpha, basis, gamma) - data.u
        assert float(residual.norm(dim=-1).max()) <= 1e-10
        errors.append(float((reg.alpha - exact).norm() / exact.norm()))
    assert all(b < 0.2 * a for a, b in itertools.pairwise(errors)), errors  # O(γ) once γ is small
    assert errors[-1] < 1e-3


def test_solver_conserves_mass_with_periodic_boundaries():
    basis = make_basis("monomial", 2, 1)
    problem = periodic_case(basis, cells=40, t_end=0.2)
    mass = float(problem.u[:, 0].sum())
    for closure in (NewtonClosure(basis), NetworkClosure(_icnn(), basis)):
        out = solve(problem, basis, closure)
        assert out.steps > 10
        assert float(out.u[:, 0].sum()) == pytest.approx(mass, rel=1e-13)
        assert float((out.u - problem.u).abs().max()) > 1e-3  # it did move


def test_non_realizable_moments_give_a_clear_error():
    basis = make_basis("monomial", 2, 1)
    good = moments(torch.tensor([[0.0, 1.0, -1.0]], dtype=F64), basis)
    for bad in ([1.0, 0.0, 2.0], [1.0, 0.5, 0.2], [-1.0, 0.0, 0.3], [1.0, float("nan"), 0.3]):
        u = torch.cat([good, torch.tensor([bad], dtype=F64)])
        with pytest.raises(ValueError, match=r"non-realizable moments \(first: cells \[1\]"):
            newton(u, basis)
    with pytest.raises(ValueError, match="u₀ m₀ > 0"):
        newton(torch.tensor([[-1.0, 0.0, 0.3]], dtype=F64), basis, gamma=0.1)
    # the regularized closure has a solution for u outside the realizable set
    u = torch.tensor([[1.0, 0.0, 2.0]], dtype=F64)
    res = newton(u, basis, gamma=0.1)
    torch.testing.assert_close(moments(res.alpha, basis, 0.1), u, atol=1e-10, rtol=0)


@pytest.mark.slow
def test_closure_train_and_solve_end_to_end(tmp_path, capsys):
    from dlrt.cli import main
    from dlrt.kinetic import save_data

    data = tmp_path / "m2.safetensors"
    save_data(data, sample(make_basis("monomial", 2, 1), 3000, bound=4.0, min_eig=1e-2, seed=0))
    args = ["closure", "train", f"data_path={data}", "width=24", "depth=2", "epochs=4", "batch_size=64"]
    args += ["lr=1e-2", "dtype=float64", f"runs_dir={tmp_path}", "name=run", "progress=false"]
    assert main(args) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 5 and metrics[0].startswith("epoch,step,train_loss,val_loss,h_err,alpha_err,u_err")
    from dlrt.training.driver import read_csv

    rows = read_csv(run / "metrics.csv")
    losses = [r["val_loss"] for r in rows]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # it learns, epoch after epoch
    assert rows[-1]["u_err"] < rows[0]["u_err"]
    assert summary["u_err"] == pytest.approx(rows[-1]["u_err"])
    assert (run / "closure.png").stat().st_size > 0 and (run / "checkpoint.safetensors").is_file()
    capsys.readouterr()
    assert main(["closure", "solve", str(run), "--cells", "30", "--t-end", "0.1"]) == 0
    result = json.loads((run / "solve.json").read_text())
    assert set(result) == {"source", "periodic"}
    p = result["periodic"]
    assert p["mass_network"] == pytest.approx(p["mass_newton"], rel=1e-12)
    assert 0 < p["rel_l2"] < 0.5
    assert (run / "solve_source.png").stat().st_size > 0
    # a broken request: a clear message and exit status 2, nothing written
    assert main(["closure", "train", "model=icnn", "lowrank=true", f"runs_dir={tmp_path}", "name=bad"]) == 2
    assert "lowrank=true applies to model=alpha" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
