"""convert / to_dense / ranks / compression."""

import pytest
import torch
from torch import nn

import dlrt
from dlrt import LowRankConv2d, LowRankLinear
from dlrt.layers import (
    LowRankAdapter,
    check_rank,
    lowrank_spec,
    register_lowrank,
    registered_lowrank,
    unregister_lowrank,
)
from dlrt.selection import excluded, matches, select, set_submodule


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
        ValueError,
        match=r"rank=12 does not fit 2 layer\(s\): 'features.0' \(8×27\) takes 1 <= rank <= 8; "
        r"'head' \(10×24\) takes 1 <= rank <= 10\. .*exclude=\('features.0', 'head'\)",
    ):
        dlrt.convert(Net(), rank=12)
    with pytest.raises(ValueError, match=r"rank=5 does not fit 1 layer\(s\): 'head' \(10×24\) takes 1 <= rank <= 4"):
        dlrt.convert(Net(), rank=5, max_rank=4, target_modules=["head"])
    with pytest.raises(ValueError, match="rank must be a positive int or a fraction in \\(0, 1\\], got rank=0"):
        dlrt.convert(Net(), rank=0)
    for tau in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"tau must be a finite number >= 0, got tau={tau}"):
            dlrt.convert(Net(), tau=tau)
    with pytest.raises(
        ValueError, match=r"conv='cp' is not a registered low-rank format; choose one of \['matrix', 'tucker'\]"
    ):
        dlrt.convert(Net(), rank=2, conv="cp")
    with pytest.raises(ValueError, match="min_rank=3 is larger than max_rank=2"):
        dlrt.convert(Net(), rank=2, min_rank=3, max_rank=2)
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


def test_a_failed_convert_leaves_the_model_unchanged():
    # The second layer cannot take rank 10: nothing may be converted (the first used to be).
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'1' \(5×20\) takes 1 <= rank <= 5"):
        dlrt.convert(model, rank=10)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ registry
class Affine(nn.Module):
    """A dense layer type dlrt does not know: y = x Wᵀ + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.weight.mT + self.bias


class LowRankAffine(LowRankLinear):
    @classmethod
    def from_dense(cls, dense, rank=None, *, tau=None, max_rank=None, min_rank=1):
        lin = nn.Linear(dense.weight.shape[1], dense.weight.shape[0])
        with torch.no_grad():
            lin.weight.copy_(dense.weight)
            lin.bias.copy_(dense.bias)
        return cls.from_linear(lin, rank, tau=tau, max_rank=max_rank, min_rank=min_rank)

    def to_dense(self):
        out = Affine(self.in_features, self.out_features)
        with torch.no_grad():
            out.weight.copy_(self.matrix())
            out.bias.copy_(self.bias)
        return out


@pytest.fixture
def affine_registered():
    register_lowrank(Affine, LowRankAffine)
    yield
    unregister_lowrank(Affine)


def test_a_registered_type_is_converted_and_converted_back(affine_registered):
    model = nn.Sequential(Affine(12, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(5, 12)
    y = model(x)
    dlrt.convert(model, rank=1.0)  # full rank everywhere: the same function
    assert type(model[0]) is LowRankAffine and type(model[2]) is LowRankLinear
    assert dlrt.ranks(model) == {"0": 8, "2": 3}
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    dlrt.to_dense(model)
    assert type(model[0]) is Affine and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already has a 'matrix' low-rank type"):
        register_lowrank(Affine, LowRankAffine)


def test_an_unregistered_type_is_a_clear_error_listing_the_registered_ones():
    listed = r"registered: nn\.Linear → dlrt\.LowRankLinear \(matrix\), nn\.Conv2d → dlrt\.LowRankConv2d \(matrix\)"
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match=rf"target_modules selects '1', a BatchNorm1d, .*{listed}"):
        dlrt.convert(model, rank=2, target_modules=["0", "1"])
    assert type(model[0]) is nn.Linear  # validated before anything changed
    with pytest.raises(TypeError, match=rf"no 'matrix' low-rank type is registered for nn\.BatchNorm1d; {listed}"):
        LowRankAdapter(nn.BatchNorm1d(4), 2)
    with pytest.raises(TypeError, match=rf"registered for [\w.]*\.Affine; {listed}"):
        lowrank_spec(Affine(3, 3))
    with pytest.raises(TypeError, match="has no from_dense classmethod"):
        register_lowrank(Affine, LowRankLinear)
    assert [(s.dense_type, s.format) for s in registered_lowrank()] == [
        (nn.Linear, "matrix"),
        (nn.Conv2d, "matrix"),
        (nn.Conv2d, "tucker"),
    ]
    # Subclasses of a registered type go through its entry (MultiheadAttention's out_proj is one).
    assert lowrank_spec(nn.modules.linear.NonDynamicallyQuantizableLinear).lowrank_type is LowRankLinear


# ------------------------------------------------------------ rank validator
@pytest.mark.parametrize(
    ("rank", "bounds", "error", "message"),
    [
        (0, {}, ValueError, r"rank=0 is out of range for layer 'fc' \(8×27\): it must satisfy 1 <= rank <= 8 "),
        (9, {}, ValueError, r"rank=9 is out of range for layer 'fc' \(8×27\): it must satisfy 1 <= rank <= 8 "),
        (-2, {}, ValueError, r"rank=-2 .* 1 <= rank <= 8 \(full rank min\(8, 27\) = 8\)"),
        (5, {"max_rank": 4}, ValueError, r"rank=5 .* 1 <= rank <= 4 \(full rank min\(8, 27\) = 8, max_rank=4\)"),
        (2, {"min_rank": 3}, ValueError, r"rank=2 .* 3 <= rank <= 8 \(full rank min\(8, 27\) = 8, min_rank=3\)"),
        (3, {"min_rank": 5, "max_rank": 4}, ValueError, r"no rank fits layer 'fc' \(8×27\): the bounds are empty"),
        (2.0, {}, TypeError, r"rank must be an int, got 2\.0 \(float\) for layer 'fc' \(8×27\)"),
        (True, {}, TypeError, r"rank must be an int, got True \(bool\)"),
    ],
)
def test_check_rank_names_the_rank_and_the_valid_range(rank, bounds, error, message):
    with pytest.raises(error, match=message):
        check_rank(rank, (8, 27), layer="fc", **bounds)


def test_check_rank_accepts_the_range_and_is_what_the_adapter_uses():
    assert [check_rank(r, (8, 27)) for r in (1, 8)] == [1, 8]
    assert check_rank(8, (8, 27), max_rank=100) == 8  # a max_rank above the full rank is capped
    conv = nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match=r"r=9 is out of range for a 8×27 weight matrix: it must satisfy 1 <= r <= 8"):
        LowRankAdapter(conv, 9)
    with pytest.raises(ValueError, match=r"r=2 .* 3 <= r <= 8 .*min_rank=3"):
        LowRankAdapter(conv, 2, min_rank=3)
    with pytest.raises(ValueError, match="cannot adapt this Conv2d: it is a grouped convolution \\(groups=2\\)"):
        LowRankAdapter(nn.Conv2d(4, 4, 3, groups=2), 2)


# ---------------------------------------------------------------- selection
def test_selection_is_public_and_shared():
    names = ["encoder", "encoder.fc1", "encoder.xfc1", "head"]
    assert [n for n in names if matches(n, ["fc1"])] == ["encoder.fc1"]
    assert [n for n in names if matches(n, r"encoder\..*")] == ["encoder.fc1", "encoder.xfc1"]
    assert [n for n in names if excluded(n, ["encoder"])] == ["encoder", "encoder.fc1", "encoder.xfc1"]
    net = Net()
    chosen = [n for n, _ in select(net, include=r".*fc\d|head", exclude=("head",), types=nn.Linear)]
    assert chosen == ["encoder.fc1", "encoder.fc2"]
    new = nn.Linear(32, 24)
    set_submodule(net, "encoder.fc1", new)
    assert net.encoder["fc1"] is new
    with pytest.raises(AttributeError, match="no submodule 'encoder.fc9'"):
        set_submodule(net, "encoder.fc9", new)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        dlrt.convert(Net(), rank=2, target_modules="(")
    with pytest.raises(TypeError, match="exclude must be a regex string or a list of module names, got 3"):
        dlrt.convert(Net(), rank=2, exclude=3)
