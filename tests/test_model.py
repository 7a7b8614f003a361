"""convert / to_dense / ranks / compression."""

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankConv2d, LowRankLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2))
        self.encoder = nn.ModuleDict({"fc1": nn.Linear(32, 24), "fc2": nn.Linear(24, 24)})
        self.head = nn.Linear(24, 10)


def test_convert_replaces_linear_and_conv_and_keeps_the_function():
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 6))
    x = torch.randn(3, 2, 4, 4)
    before = model(x)
    dlrt.convert(model, rank=6)  # full rank for both layers: same function
    assert isinstance(model[0], LowRankConv2d) and isinstance(model[3], LowRankLinear)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert dlrt.ranks(model) == {"0": 6, "3": 6}


def test_target_modules_by_list_regex_and_exclude():
    m = dlrt.convert(Net(), rank=4, exclude=("head",))
    assert set(dlrt.ranks(m)) == {"features.0", "encoder.fc1", "encoder.fc2"}  # grouped conv skipped
    m = dlrt.convert(Net(), rank=4, target_modules=["fc1", "head"])
    assert set(dlrt.ranks(m)) == {"encoder.fc1", "head"}
    m = dlrt.convert(Net(), rank=4, target_modules=r"encoder\..*")
    assert set(dlrt.ranks(m)) == {"encoder.fc1", "encoder.fc2"}
    m = dlrt.convert(Net(), rank=4, exclude=("encoder", "head"))
    assert set(dlrt.ranks(m)) == {"features.0"}
    m = dlrt.convert(Net(), rank=4, exclude=r".*fc\d|head")
    assert set(dlrt.ranks(m)) == {"features.0"}


def test_convert_with_tau_and_max_rank():
    lin = nn.Linear(30, 20)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(20, 3) @ torch.randn(3, 30))
    m = dlrt.convert(nn.Sequential(lin), tau=1e-4, max_rank=10)
    assert m[0].rank == 3 and m[0].max_rank == 10


def test_nothing_to_convert_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to convert"):
        dlrt.convert(nn.Sequential(nn.ReLU()), rank=2)
    with pytest.raises(ValueError, match="nothing to convert"):
        dlrt.convert(Net(), rank=2, target_modules=["nope"])


def test_bad_convert_arguments():
    with pytest.raises(
        ValueError, match=r"rank=12 is too large for layer 'features.0' \(8×27, full rank 8\): pass exclude"
    ):
        dlrt.convert(Net(), rank=12)
    with pytest.raises(ValueError, match="rank"):
        dlrt.convert(Net(), rank=0)
    with pytest.raises(ValueError, match="tau"):
        dlrt.convert(Net(), tau=-1.0)
    with pytest.raises(ValueError, match="conv="):
        dlrt.convert(Net(), rank=2, conv="cp")
    with pytest.raises(ValueError, match="grouped"):
        dlrt.convert(Net(), rank=2, target_modules=["features.2"])
    with pytest.raises(ValueError, match="rank=, tau="):
        dlrt.convert(Net())


def test_to_dense_round_trip():
    model = dlrt.convert(Net(), rank=4, exclude=("head",))
    x = torch.randn(2, 24)
    y = model.encoder["fc2"](x)
    dlrt.to_dense(model)
    assert not list(dlrt.lowrank_layers(model))
    assert type(model.encoder["fc2"]) is nn.Linear
    torch.testing.assert_close(model.encoder["fc2"](x), y, atol=1e-6, rtol=1e-5)


def test_compression_counts_every_stored_parameter():
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    dense = sum(p.numel() for p in model.parameters())
    dlrt.convert(model, rank=5, exclude=("1",))
    stored = (100 * 5 + 5 * 5 + 50 * 5 + 50) + (50 * 10 + 10)
    assert dlrt.parameter_counts(model) == (stored, dense)
    assert dlrt.compression(model) == pytest.approx(1 - stored / dense)


def test_fractional_rank_is_per_layer():
    model = nn.Sequential(nn.Linear(40, 20), nn.Linear(20, 10), nn.Linear(10, 2))
    dlrt.convert(model, rank=0.5, exclude=("2",))
    assert dlrt.ranks(model) == {"0": 10, "1": 5}
    model = nn.Sequential(nn.Linear(40, 20), nn.Linear(20, 10))
    dlrt.convert(model, rank=1.0, max_rank=8)
    assert dlrt.ranks(model) == {"0": 8, "1": 8}
    with pytest.raises(ValueError, match="fraction"):
        dlrt.convert(nn.Sequential(nn.Linear(4, 4)), rank=1.5)
