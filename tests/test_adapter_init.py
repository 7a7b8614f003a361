"""How GeoLoRA adapters start (``init``): the starting factors, and the first steps of every rank-adaptive
integrator from them checked against float64 dense formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dlrt.layers import ADAPTER_INITS, LowRankAdapter
from dlrt.peft import GeoLoRAConfig, get_geolora_model
from dlrt.training.config import FinetuneConfig

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _orth(A: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of range(A), float64, by SVD (a reference independent of dlrt.linalg)."""
    Q, s, _ = torch.linalg.svd(A, full_matrices=False)
    return Q[:, s > 1e-12 * s[0]]


def _proj(Q: torch.Tensor) -> torch.Tensor:
    return Q @ Q.T


@pytest.mark.parametrize("init", ADAPTER_INITS)
def test_every_init_starts_at_zero_on_orthonormal_bases(init):
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    adapter = LowRankAdapter(lin, 3, init=init)
    lora = adapter.lora
    x = torch.randn(5, 12, dtype=DT)
    torch.testing.assert_close(adapter(x), lin(x), rtol=0, atol=0)  # the function is unchanged
    assert not lora.S.detach().any() and lora.rank == 3
    for B in (lora.U.detach(), lora.V.detach()):
        torch.testing.assert_close(B.T @ B, torch.eye(3, dtype=DT), **TOL)
    assert lora.pending_growth == (init == "gradient") and not lora.just_grown
    assert adapter.init == init and f"init={init!r}" in repr(adapter)


def test_lora_init_spans_the_rows_of_loras_kaiming_uniform_A():
    """V spans the rows of the r×in matrix PEFT draws for lora_A (kaiming-uniform, a=√5: bound 1/√in)."""
    lin = nn.Linear(12, 9).double()
    adapter = LowRankAdapter(lin, 3, init="lora")
    torch.manual_seed(7)
    adapter.reset_adapter()
    torch.manual_seed(7)
    A = torch.empty(3, 12, dtype=DT)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    assert A.abs().max() <= 1 / math.sqrt(12)
    V = adapter.lora.V.detach()
    torch.testing.assert_close(_proj(V), _proj(_orth(A.T)), **TOL)


def test_reset_adapter_switches_the_init_and_refuses_bad_values_first():
    lin = nn.Linear(12, 9).double()
    adapter = LowRankAdapter(lin, 3)
    assert adapter.init == "gradient" and adapter.lora.pending_growth
    adapter.reset_adapter(2, init="random")
    assert adapter.init == "random" and not adapter.lora.pending_growth and adapter.rank == 2
    adapter.reset_adapter()  # keeps the adapter's init
    assert not adapter.lora.pending_growth
    U = adapter.lora.U.detach().clone()
    with pytest.raises(ValueError, match=r"adapter init must be one of \('gradient', 'random', 'lora'\), got 'zeros'"):
        adapter.reset_adapter(init="zeros")
    assert adapter.init == "random" and torch.equal(adapter.lora.U.detach(), U)  # nothing changed
    with pytest.raises(ValueError, match="adapter init must be one of"):
        LowRankAdapter(lin, 3, init="LoRA")


def test_configs_name_a_bad_init():
    with pytest.raises(ValueError, match=r"adapter init must be one of .*got 'svd'"):
        GeoLoRAConfig(init="svd")
    assert GeoLoRAConfig().init == "gradient"
    assert GeoLoRAConfig.from_dict(GeoLoRAConfig(init="random").to_dict()).init == "random"
    assert FinetuneConfig().adapter_init == "gradient"
    assert FinetuneConfig(adapter_init="lora").adapter_init == "lora"
    with pytest.raises(ValueError, match=r"adapter_init='zero' is not one of gradient, random, lora"):
        FinetuneConfig(adapter_init="zero")
    with pytest.raises(ValueError, match=r"adapter_init='random' sets how GeoLoRA's adapters start"):
        FinetuneConfig(method="lora", adapter_init="random")
    assert FinetuneConfig(method="lora").adapter_init is None


def _first_step(integrator: str, init: str, steps: int = 1):
    """One adapter (10 → 8, r = 2, scaling 1.5) on a float64 linear layer after ``steps`` SGD steps at tau = 0,
    with its bases before each step and the dense gradients ``s·∂ℒ/∂W`` at the (unchanged or moved) weight."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 8)).double()
    W0, b0 = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    config = GeoLoRAConfig(r=2, tau=0.0, truncation="local", lora_alpha=3.0, integrator=integrator, init=init)
    model = get_geolora_model(base, config)
    adapter = model.adapters()["0"]
    x = torch.randn(6, 10, dtype=DT)
    lr = 0.1
    opt = model.make_optimizer(optimizer="sgd", lr=lr)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    history = []
    for _ in range(steps):
        U, V = adapter.lora.U.detach().clone(), adapter.lora.V.detach().clone()
        W = (W0 + adapter.delta_weight()).requires_grad_(True)
        nn.functional.linear(x, W, b0).pow(2).sum().backward()
        history.append((U, V, adapter.scaling * W.grad))
        opt.step(closure)
    return adapter, history, lr


@pytest.mark.parametrize("init", ["random", "lora"])
def test_parallel_first_step_from_random_bases_is_the_tangent_step(init):
    """docs/algorithms.md §3 from S₀ = 0 on the starting bases: U S Vᵀ = −λ P_T(G), the tangent projection of
    the update's gradient at (U₀, V₀)."""
    adapter, [(U0, V0, G)], lr = _first_step("parallel", init)
    PU, PV = _proj(U0), _proj(V0)
    tangent = PU @ G + G @ PV - PU @ G @ PV
    torch.testing.assert_close(adapter.lora.matrix().detach(), -lr * tangent, **TOL)


def test_parallel_gradient_init_grows_the_bases_then_takes_the_tangent_step():
    """Step 1 replaces the placeholder bases by range(G V₀), range(Gᵀ U₀) at S = 0 (function unchanged);
    step 2 is the tangent step at the grown bases."""
    adapter, [(U0, V0, G0), (U1, V1, G1)], lr = _first_step("parallel", "gradient", steps=2)
    torch.testing.assert_close(_proj(U1), _proj(_orth(G0 @ V0)), **TOL)
    torch.testing.assert_close(_proj(V1), _proj(_orth(G0.T @ U0)), **TOL)
    torch.testing.assert_close(G1, G0, **TOL)  # the first step left the weight where it was
    PU, PV = _proj(U1), _proj(V1)
    tangent = PU @ G1 + G1 @ PV - PU @ G1 @ PV
    torch.testing.assert_close(adapter.lora.matrix().detach(), -lr * tangent, **TOL)


@pytest.mark.parametrize("init", ADAPTER_INITS)
def test_bug_first_step_is_the_galerkin_step_on_the_augmented_bases(init):
    """BUG from S₀ = 0 (every init: a fresh adapter takes the K/L step from its starting bases):
    U S Vᵀ = −λ P_Û G P_V̂, Û = orth([U₀, G V₀]), V̂ = orth([V₀, Gᵀ U₀])."""
    adapter, [(U0, V0, G)], lr = _first_step("bug", init)
    PU = _proj(_orth(torch.cat([U0, G @ V0], 1)))
    PV = _proj(_orth(torch.cat([V0, G.T @ U0], 1)))
    torch.testing.assert_close(adapter.lora.matrix().detach(), -lr * PU @ G @ PV, **TOL)


@pytest.mark.parametrize("init", ADAPTER_INITS)
def test_abc_first_step_is_the_backward_corrected_L_step(init):
    """abc from S₀ = 0: Û = orth([U₀, G V₀]), Ŝ = 0, L¹ = −λ GᵀÛ, so U S Vᵀ = Û L¹ᵀ = −λ P_Û G."""
    adapter, [(U0, V0, G)], lr = _first_step("abc", init)
    PU = _proj(_orth(torch.cat([U0, G @ V0], 1)))
    torch.testing.assert_close(adapter.lora.matrix().detach(), -lr * PU @ G, **TOL)
