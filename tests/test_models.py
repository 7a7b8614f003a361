"""The model zoo: every registered model builds, runs, converts, trains a step and goes back to dense."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import dlrt
from dlrt.models import MLP, VGG, LeNet5, ResNet20, SmallVGG, default_exclude, get_model, list_models

RANK = 8
BATCH = 4  # > 1 per channel even where VGG's BatchNorm sees 1×1 maps

EXPECTED_INPUT = {
    "mlp": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "vgg11": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "vgg_small": (1, 28, 28),
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_names_and_unknown_name():
    assert list_models("classifier") == sorted(EXPECTED_INPUT)
    assert list_models("language") == ["gpt-large", "gpt-medium", "gpt-small", "gpt-tiny"]
    assert list_models() == sorted([*EXPECTED_INPUT, *list_models("language")])
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'.*lenet5, mlp, resnet20, vgg11, vgg16, vgg_small"):
        get_model("resnet18")
    assert isinstance(get_model("VGG11"), VGG) and get_model("vgg11").depth == 11


def test_import_dlrt_does_not_import_the_zoo():
    code = "import sys, dlrt; assert 'dlrt.models' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", list_models("classifier"))
def test_dense_forward_shape(name):
    model = get_model(name, num_classes=7)
    assert model.input_shape == EXPECTED_INPUT[name]
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7
    y = model(torch.randn(2, *model.input_shape))
    assert y.shape == (2, 7)


def test_parameter_counts():
    # LeNet5 20/50/500: 520 + 25,050 + 400,500 + 5,010.
    assert n_params(LeNet5()) == 431_080
    # ResNet-20 "0.27M" (He et al. 2016, Table 6) with parameter-free option-A shortcuts;
    # option B adds the two 1×1 projections (512 + 2048) and their BN (2·32 + 2·64).
    assert n_params(ResNet20()) == 269_722
    assert n_params(ResNet20(shortcut="B")) == 269_722 + 2_560 + 192
    # 784·500+500 + 3·(500·500+500) + 500·10+10.
    assert n_params(MLP()) == 1_149_010
    assert n_params(VGG(11)) == 9_491_018 and n_params(VGG(16)) == 14_986_698
    # 3×3 convolutions 1→16→32→64→64 without bias: 144 + 4,608 + 18,432 + 36,864; BN 2·176; head 650.
    assert n_params(SmallVGG()) == 61_050


def test_mlp_layer_names_and_lenet_shape():
    assert [n for n, m in MLP(hidden=(8, 6)).named_children()] == ["fc1", "fc2", "head"]
    assert MLP(in_features=20, hidden=(5,)).input_shape == (20,)
    assert LeNet5(in_channels=3).input_shape == (3, 28, 28)


def test_default_exclude():
    assert default_exclude(LeNet5()) == ("head",)
    assert default_exclude(LeNet5(), rank=8) == ("head",)
    assert default_exclude(LeNet5(), rank=21) == ("head", "conv1")  # conv1: min(20, 25) = 20
    assert default_exclude(VGG(11), rank=28) == ("head", "features.0")  # min(64, 27) = 27
    assert default_exclude(MLP(), head="") == ()
    model = ResNet20(shortcut="B")
    ex = default_exclude(model, rank=17)
    # the stem, the six 16-channel convolutions and the 16→32 projection (1×1: min(32, 16) = 16)
    assert ex[:2] == ("head", "conv") and "layer2.0.shortcut.0" in ex and len(ex) == 2 + 6 + 1
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    dlrt.convert(model, rank=17, exclude=ex)
    assert set(dlrt.ranks(model)) == layers - set(ex)
    with pytest.raises(ValueError, match=r"rank=17 does not fit 7 layer\(s\): 'conv' \(16×27\) takes 1 <= rank <= 16"):
        dlrt.convert(ResNet20(), rank=17, exclude=("head",))


def test_a_rank_too_large_for_every_layer_names_the_rank_and_each_range():
    # `dlrt train model=lenet5 rank=100000`: default_exclude used to exclude every layer, and
    # convert then blamed exclude= ("nothing to convert ... outside exclude=").
    ranges = (
        r"'conv1' \(20×25\) takes 1 <= rank <= 20; 'conv2' \(50×500\) takes 1 <= rank <= 50; "
        r"'fc1' \(500×800\) takes 1 <= rank <= 500; 'head' \(10×500\) takes 1 <= rank <= 10"
    )
    with pytest.raises(ValueError, match=rf"^rank=100000 fits no layer of LeNet5: {ranges}\. Pass a rank <= 500"):
        default_exclude(LeNet5(), rank=100000, head="")
    with pytest.raises(ValueError, match=rf"^rank=100000 does not fit 4 layer\(s\): {ranges}\. Pass a rank"):
        dlrt.convert(LeNet5(), rank=100000)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"rank must be a positive int, got rank={bad}"):
            default_exclude(LeNet5(), rank=bad)


# Every registered model, plus ResNet-20 with its 1×1 projection shortcuts (converted too).
CASES = [pytest.param(n, {}, id=n) for n in list_models("classifier")]
CASES.append(pytest.param("resnet20", {"shortcut": "B"}, id="resnet20-B"))


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_convert_train_and_back_to_dense(name, kwargs):
    model = get_model(name, **kwargs)
    dense_layers = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    dlrt.convert(model, rank=RANK, exclude=("head",))  # every zoo model takes rank 8 with only head dense
    assert set(dlrt.ranks(model)) == dense_layers - {"head"}
    assert isinstance(model.head, nn.Linear)

    x = torch.randn(BATCH, *model.input_shape)
    target = torch.randint(0, 10, (BATCH,))
    opt = dlrt.DLRTOptimizer(model, integrator="bug", optimizer="sgd", lr=0.01)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        return loss

    model.train()
    losses = [opt.step(closure).item() for _ in range(3)]
    # The integrator trains: the loss on the fixed batch falls step by step ...
    assert losses[0] > losses[1] > losses[2], losses
    # ... and every layer stays a valid rank-adaptive factorization: orthonormal bases,
    # a square core, the rank within the layer's bounds.
    for lname, layer in dlrt.lowrank_layers(model):
        r = layer.rank
        assert layer.min_rank <= r <= layer.max_rank == min(layer.shape), lname
        assert layer.S.shape == (r, r) and layer.V.shape == (layer.in_dim, r), lname
        eye = torch.eye(r)
        torch.testing.assert_close(layer.U.detach().mT @ layer.U.detach(), eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.V.detach().mT @ layer.V.detach(), eye, atol=1e-5, rtol=0)

    model.eval()
    dense = dlrt.to_dense(copy.deepcopy(model))
    assert not dlrt.ranks(dense)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=1e-4, rtol=1e-4)
