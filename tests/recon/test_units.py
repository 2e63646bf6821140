import pytest
import torchvision
from torch import nn

from pdq.errors import PdqError
from pdq.models.fmnist import mobilenetv2_fmnist, resnet20_fmnist
from pdq.quant import act_quant_names, quant_layer_names, quantize_model
from pdq.recon import find_units

# spec §2.3: torchvision ResNet-18 10, ResNet-50 18, MobileNetV2 20, RegNetX-600MF 18, RegNetX-3.2GF 27,
# MNasNet 21 (3 stem layers, 16 inverted residuals, 1x1 conv, classifier)
COUNTS = [
    ("resnet18", 10), ("resnet50", 18), ("mobilenet_v2", 20), ("regnet_x_400mf", 2 + 22),
    ("regnet_x_3_2gf", 27), ("mnasnet1_0", 21),
]


@pytest.mark.parametrize("name,count", COUNTS)
def test_torchvision_unit_counts(name, count):
    qm = quantize_model(torchvision.models.get_model(name))
    units = find_units(qm, "block")
    assert len(units) == count
    layer_units = find_units(qm, "layer")
    assert [u.name for u in layer_units] == quant_layer_names(qm)
    # every quantized layer belongs to exactly one block-pattern unit
    layers = [layer for u in units for layer in u.layers(qm)]
    assert sorted(layers) == sorted(quant_layer_names(qm))


def test_reference_model_units():
    qm = quantize_model(resnet20_fmnist())
    units = find_units(qm)
    assert [u.name for u in units] == ["conv1"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["fc"]
    assert units[1].kind == "block" and units[0].kind == "layer"
    assert units[1].act_quants(qm) == ["layer1.0.conv1.aq", "layer1.0.aq"]
    assert units[0].act_quants(qm) == ["conv1.aq"] and units[0].output.target == "conv1.aq"
    assert units[1].input is units[0].output and units[2].input is units[1].output
    assert units[4].layers(qm) == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    mq = quantize_model(mobilenetv2_fmnist())
    assert len(find_units(mq)) == 12
    covered = {q for u in find_units(mq) for q in u.act_quants(mq)}
    assert covered == set(act_quant_names(mq))


class MyBlock(nn.Module):
    """A residual block type unknown to the registry."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.b(self.act(self.a(x))))


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.Sequential(MyBlock(8), MyBlock(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.blocks(self.stem(x).relu())
        return self.head(x.mean((2, 3)))


def test_fallback_groups_unknown_residual_blocks():
    qm = quantize_model(MyNet())
    units = find_units(qm)
    assert [(u.name, u.kind) for u in units] == [("stem", "layer"), ("blocks.0", "block"), ("blocks.1", "block"),
                                                 ("head", "layer")]
    assert units[1].layers(qm) == ["blocks.0.a", "blocks.0.b"]
    with pytest.raises(PdqError, match="pattern='stage' is unknown; accepted: block, layer"):
        find_units(qm, "stage")


def _capacity(qm, layers):
    return sum(qm.get_submodule(n).weight.numel() * qm.get_submodule(n).weight_quant.bits for n in layers)


@pytest.mark.parametrize("model", [resnet20_fmnist, mobilenetv2_fmnist])
def test_merges_join_the_adjacent_units_whose_capacities_differ_most(model):
    """MRECG's unit policy: k merges join the k adjacent pairs of largest capacity difference (parameters x weight
    bits; never the first or the last unit) into one unit each, with the same layers in the same order."""
    qm = quantize_model(model(), bits=4)
    first = quant_layer_names(qm)[0]
    qm.get_submodule(first).weight_quant.bits = 8  # a stem at another width weighs in its capacity
    plain = find_units(qm)
    cap = [_capacity(qm, u.layers(qm)) for u in plain]
    diffs = sorted(range(1, len(plain) - 2), key=lambda j: -abs(cap[j + 1] - cap[j]))
    for k in (1, 3):
        merged = find_units(qm, merges=k)
        assert len(merged) == len(plain) - k
        assert [n for u in merged for n in u.layers(qm)] == [n for u in plain for n in u.layers(qm)]
        assert merged[0].name == plain[0].name and merged[-1].name == plain[-1].name
        joined = {(j, j + 1) for j in diffs[:k]}
        for u in merged:
            parts = u.name.split("+")
            if len(parts) == 1:
                assert u.source != "merged"
                continue
            idx = [next(i for i, p in enumerate(plain) if p.name == name) for name in parts]
            assert u.source == "merged" and u.kind == "block" and all((a, a + 1) in joined for a in idx[:-1])
            assert u.input is plain[idx[0]].input and u.output is plain[idx[-1]].output
            assert u.act_quants(qm) == [a for i in idx for a in plain[i].act_quants(qm)]


def test_every_pair_merged_leaves_the_stem_and_the_head_alone_and_too_many_merges_are_one_error():
    qm = quantize_model(resnet20_fmnist())
    plain = find_units(qm)
    pairs = len(plain) - 3
    merged = find_units(qm, merges=pairs)
    assert [u.name for u in merged] == [plain[0].name, "+".join(u.name for u in plain[1:-1]), plain[-1].name]
    with pytest.raises(PdqError, match=rf"unit_merges={pairs + 1} is more than .* {pairs} pairs.*accepted: 0..{pairs}"):
        find_units(qm, merges=pairs + 1)
    with pytest.raises(PdqError, match="unit_merges=1 needs pattern=block"):
        find_units(qm, "layer", merges=1)
    from tests.conftest import make_phase

    with pytest.raises(PdqError, match="method.unit_merges=2 needs method.pattern=block.*pattern=layer"):
        make_phase("adaround", unit_merges=2)  # refused with the config, before any work


def test_merges_on_the_reference_models_make_one_unit_of_three_in_the_widest_stage():
    """With the stem and the head at 8 bits, the two largest capacity differences share a unit on both models."""
    for model, joined in ((resnet20_fmnist, "layer2.2+layer3.0+layer3.1"),
                          (mobilenetv2_fmnist, "features.7+features.8+features.9")):
        qm = quantize_model(model(), bits=4)
        for name in (quant_layer_names(qm)[0], quant_layer_names(qm)[-1]):
            qm.get_submodule(name).weight_quant.bits = 8
        assert [u.name for u in find_units(qm, merges=2) if u.source == "merged"] == [joined]


class PooledNet(nn.Module):
    """Blocks with a pooling layer between the first two: glue that no unit owns."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.a, self.pool, self.b, self.c = MyBlock(8), nn.MaxPool2d(2), MyBlock(8), MyBlock(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.c(self.b(self.pool(self.a(self.stem(x).relu()))))
        return self.head(x.mean((2, 3)))


def test_a_merged_unit_holds_the_glue_between_its_parts():
    qm = quantize_model(PooledNet(), bits=2)
    for name in ("b.a", "b.b"):  # b unlike both neighbours; the tie goes to the earlier pair, a with b
        qm.get_submodule(name).weight_quant.bits = 8
    plain = find_units(qm)
    assert [u.name for u in plain] == ["stem", "a", "b", "c", "head"]
    (merged,) = [u for u in find_units(qm, merges=1) if u.source == "merged"]
    assert merged.name == "a+b" and merged.input is plain[1].input and merged.output is plain[2].output
    pool = next(n for n in qm.graph.nodes if n.op == "call_module" and n.target == "pool")
    assert pool in merged.nodes and not any(pool in u.nodes for u in plain)
