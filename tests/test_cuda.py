"""The CUDA paths: every integrator, both contraction routes, fused inner steps, mixed precision, checkpoints.

Marked ``gpu``: skipped where no CUDA device is present. Each test runs the same
computation on the GPU and on the CPU and compares the two, so a device-specific
path (a kernel without a CUDA implementation, a host tensor mixed into a device
computation, a dtype the CUDA kernel refuses) fails here.
``DLRT_GPU_TEST_DEVICE=cpu`` runs them against the CPU itself (to check the tests).
"""

import os

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankConv2d, LowRankLinear, linalg

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("DLRT_GPU_TEST_DEVICE", "cuda")


class Net(nn.Module):
    """A low-rank convolution on the dense route, one on the thin route, a low-rank and a dense linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = LowRankConv2d(1, 6, 3, rank=4, padding=1)
        self.conv1.contraction = "dense"
        self.conv2 = LowRankConv2d(6, 8, 3, rank=3)
        self.conv2.contraction = "thin"
        self.fc = LowRankLinear(8 * 6 * 6, 32, rank=5)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def twins():
    torch.manual_seed(0)
    cpu = Net()
    gpu = Net().to(DEVICE)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def batch(i, device="cpu"):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    return x.to(device), y.to(device)


def closure_for(model, opt, x, y, autocast_dtype=None):
    def closure():
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def assert_models_close(cpu, gpu, atol):
    assert dlrt.ranks(cpu) == dlrt.ranks(gpu)
    for name in ("conv1", "conv2", "fc"):
        a, b = getattr(cpu, name), getattr(gpu, name)
        torch.testing.assert_close(b.matrix().detach().cpu(), a.matrix().detach(), atol=atol, rtol=0, msg=name)
        for B in (b.U, b.V):  # orthonormal on the device too
            eye = torch.eye(B.shape[1], device=B.device)
            torch.testing.assert_close(B.detach().T @ B.detach(), eye, atol=1e-5, rtol=0)
    for p, q in zip(cpu.head.parameters(), gpu.head.parameters()):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), atol=atol, rtol=0)


@pytest.mark.parametrize("integrator", ["bug", "parallel", "fixed", "abc"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "geo-heavyball", "geo-adam"])
def test_integrator_steps_on_the_device_as_on_the_cpu(integrator, optimizer):
    cpu, gpu = twins()
    kw = dict(integrator=integrator, optimizer=optimizer, lr=0.01, tau=0.05, coefficient_steps=2)
    opt_c, opt_g = dlrt.DLRTOptimizer(cpu, **kw), dlrt.DLRTOptimizer(gpu, **kw)
    for i in range(4):
        x, y = batch(i)
        opt_c.step(closure_for(cpu, opt_c, x, y))
        opt_g.step(closure_for(gpu, opt_g, x.to(DEVICE), y.to(DEVICE)))
    assert gpu.fc.U.device.type == torch.device(DEVICE).type
    for state in opt_g.state.values():
        assert all(v.device.type == torch.device(DEVICE).type for v in state.values() if torch.is_tensor(v))
    assert_models_close(cpu, gpu, atol=1e-4)


def test_augmentation_on_the_device_as_on_the_cpu():
    torch.manual_seed(0)
    U0 = linalg.orth(torch.randn(300, 8))
    well = torch.randn(300, 8)
    ill = U0 @ torch.randn(8, 3) + 1e-7 * torch.randn(300, 3)  # inside range(U0) up to round-off: adds nothing
    for X in (well, ill):
        U_c, R_c = linalg.augment_basis_qr(U0, X)
        U_g, R_g = linalg.augment_basis_qr(U0.to(DEVICE), X.to(DEVICE))
        assert U_g.shape == U_c.shape and U_g.device.type == torch.device(DEVICE).type
        eye = torch.eye(U_g.shape[1], device=U_g.device)
        torch.testing.assert_close(U_g.T @ U_g, eye, atol=1e-5, rtol=0)
        # Same subspace and the same factor R = Ûᵀ[U0, X] (the sign rule makes both unique).
        torch.testing.assert_close((U_g @ U_g.T).cpu(), U_c @ U_c.T, atol=1e-4, rtol=0)
        torch.testing.assert_close(R_g.cpu(), R_c, atol=1e-4, rtol=0)


@pytest.mark.parametrize("integrator", ["bug", "parallel", "abc"])
def test_fp16_with_grad_scaler_on_the_device(integrator):
    # SGD: its step is proportional to the gradient, so fp16 rounding stays small (Adam's sign-like
    # steps turn it into differences of lr), and a missed unscaling would show as a step 1024× too long.
    cpu, gpu = twins()
    kw = dict(integrator=integrator, optimizer="sgd", lr=0.05, momentum=0.5, tau=0.05)
    opt_c, opt_g = dlrt.DLRTOptimizer(cpu, **kw), dlrt.DLRTOptimizer(gpu, **kw)
    scaler = torch.amp.GradScaler(torch.device(DEVICE).type, init_scale=2.0**10)
    for i in range(3):
        x, y = batch(i)
        opt_c.step(closure_for(cpu, opt_c, x, y))
        xg, yg = x.to(DEVICE), y.to(DEVICE)
        opt_g.zero_grad()
        with torch.autocast(xg.device.type, dtype=torch.float16):
            loss = nn.functional.cross_entropy(gpu(xg), yg)
        scaler.scale(loss).backward()
        scaler.step(opt_g)
        scaler.update()
    assert opt_g.steps == 3  # no overflow at this scale
    assert_models_close(cpu, gpu, atol=1e-3)


@pytest.mark.parametrize("integrator", ["bug", "parallel"])
def test_bf16_autocast_on_the_device(integrator):
    cpu, gpu = twins()
    kw = dict(integrator=integrator, optimizer="sgd", lr=0.05, momentum=0.5, tau=0.05)
    opt_c, opt_g = dlrt.DLRTOptimizer(cpu, **kw), dlrt.DLRTOptimizer(gpu, **kw)
    for i in range(3):
        x, y = batch(i)
        opt_c.step(closure_for(cpu, opt_c, x, y))
        opt_g.step(closure_for(gpu, opt_g, x.to(DEVICE), y.to(DEVICE), autocast_dtype=torch.bfloat16))
    assert gpu.fc.U.dtype == torch.float32
    assert_models_close(cpu, gpu, atol=1e-3)


def test_a_checkpoint_saved_on_the_device_loads_on_the_cpu(tmp_path):
    _, gpu = twins()
    opt_g = dlrt.DLRTOptimizer(gpu, integrator="bug", optimizer="adam", lr=0.01, tau=0.05)
    x, y = batch(0, DEVICE)
    opt_g.step(closure_for(gpu, opt_g, x, y))
    path = dlrt.save(tmp_path / "ck.safetensors", gpu, opt_g)
    torch.manual_seed(1)
    cpu = Net()
    opt_c = dlrt.DLRTOptimizer(cpu, integrator="bug", optimizer="adam", lr=0.01, tau=0.05)
    dlrt.load(path, cpu, opt_c)
    assert_models_close(cpu, gpu, atol=0)
    # And both continue identically up to device round-off.
    x, y = batch(1)
    opt_c.step(closure_for(cpu, opt_c, x, y))
    opt_g.step(closure_for(gpu, opt_g, x.to(DEVICE), y.to(DEVICE)))
    assert_models_close(cpu, gpu, atol=1e-4)
