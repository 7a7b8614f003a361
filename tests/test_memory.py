"""dlrt.training.memory: the measured peak of a step, checked on allocations of known size."""

import torch
from torch import nn

from dlrt.training.memory import peak_step_bytes, resident_bytes

MiB = 2**20


def test_peak_counts_live_allocations_and_frees():
    kept = []

    def step():
        a = torch.ones(MiB // 4)  # 1 MiB, kept
        b = torch.ones(MiB // 2)  # 2 MiB, freed
        del b
        c = torch.ones(MiB // 8)  # 0.5 MiB, freed: below the earlier peak
        del c
        kept.append(a)

    assert peak_step_bytes(step) == 3 * MiB


def test_peak_of_repeated_temporaries_is_one_temporary():
    def step():
        for _ in range(4):
            t = torch.ones(MiB // 4)
            del t

    assert peak_step_bytes(step) == MiB


def test_training_step_peak_covers_gradients_and_saved_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(128, 64)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    step()
    model.zero_grad(set_to_none=True)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = 128 * 512 * 4  # the ReLU output, saved for both backward passes
    peak = peak_step_bytes(step)
    assert peak >= grads + hidden
    assert peak < grads + 6 * hidden  # and not wildly more


def test_resident_bytes_counts_shared_memory_once():
    model = nn.Linear(8, 4)
    model.register_buffer("tied", model.weight.data)  # another tensor on the weight's memory
    model.register_buffer("own", torch.zeros(5))
    opt = torch.optim.Adam(model.parameters())
    n = 8 * 4 + 4  # weight + bias
    assert resident_bytes(model, opt) == 4 * (n + 5)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    steps = sum(s["step"].untyped_storage().nbytes() for s in opt.state.values())
    # + gradients, Adam's two moments and its step counters
    assert resident_bytes(model, opt) == 4 * (n + 5 + n + 2 * n) + steps
