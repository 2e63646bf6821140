"""Explicit per-layer bit layout (spec §1.4, §9).

Presets:
* `pdquant`: stem weights 8 bit, stem output at a_bits, FC weights 8 bit, FC input 8 bit, logits FP.
* `brecq`:   as pdquant but the stem output is 8 bit and the stem is not reconstructed.
The model input, quantized under a runtime backend (`backend`, `pdq.quant.backends`), is 8 bit in both.
Any preset value can be overridden (`stem_w_bits`, `stem_out_bits`, `fc_w_bits`, `fc_in_bits`, `in_bits`), and
single quantizers by name in `per_layer` (a layer name sets its weight bits, an activation quantizer
name such as `layer1.0.aq` its activation bits): a dict, or on the command line a list of
`name:bits` strings (`quant.per_layer=[layer1.0.aq:8,conv1:4]`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx

from pdq.errors import PdqError
from pdq.quant.backends import get_backend
from pdq.quant.graph import act_quant_names, input_quantizer, quant_layer_names, stem_and_head
from pdq.quant.label import bit_setting
from pdq.quant.quantizers import check_bits

if TYPE_CHECKING:
    import torch

    from pdq.context import RunContext

PRESETS: dict[str, dict] = {
    "pdquant": {"stem_w_bits": 8, "stem_out_bits": None, "fc_w_bits": 8, "fc_in_bits": 8, "in_bits": 8,
                "reconstruct_stem": True},
    "brecq": {"stem_w_bits": 8, "stem_out_bits": 8, "fc_w_bits": 8, "fc_in_bits": 8, "in_bits": 8,
              "reconstruct_stem": False},
}
PRESET_KEYS = ("stem_w_bits", "stem_out_bits", "fc_w_bits", "fc_in_bits", "in_bits")


@dataclass
class BitLayout:
    """The bit widths of every quantizer: built from conf/quant (`quant=w4a4`, ...), which holds every value
    (conf/quant/_base.yaml: the layout preset, no per-preset overrides, academic backend); no defaults here.
    None for a preset key: the `layout` preset's value."""
    w_bits: int
    a_bits: int
    layout: str
    stem_w_bits: int | None
    stem_out_bits: int | None
    fc_w_bits: int | None
    fc_in_bits: int | None
    in_bits: int | None
    per_layer: dict[str, int] | list[str]
    backend: str

    @property
    def label(self) -> str:
        """The bit setting in logs, as the report names it: `W4A4`."""
        return bit_setting(self.w_bits, self.a_bits)

    def check_run(self) -> None:
        """What a run (not a measurement alone) needs besides the values checked on construction: nothing."""

    def prepare(self, gm: fx.GraphModule, calib: torch.Tensor, ctx: RunContext) -> tuple[BitLayout, dict]:
        """The layout a run quantizes with, decided on its quantized graph and calibration images, and the
        record of that decision: {"results": entries for results.json, "files": {name: content} for the run
        dir}. A fixed layout is decided already."""
        return self, {"results": {}, "files": {}}

    def __post_init__(self):
        if isinstance(self.per_layer, (list, tuple)):
            self.per_layer = dict(_parse_override(item) for item in self.per_layer)
        if self.layout not in PRESETS:
            raise PdqError(f"quant.layout={self.layout!r} is unknown; accepted: {', '.join(PRESETS)}")
        get_backend(self.backend)
        for key in ("w_bits", "a_bits", *PRESET_KEYS):
            value = getattr(self, key)
            if value is not None:
                try:
                    check_bits(value, f"quant.{key}")
                except ValueError as e:
                    raise PdqError(str(e)) from None
        for name, value in dict(self.per_layer).items():
            try:
                check_bits(value, f"quant.per_layer.{name}")
            except ValueError as e:
                raise PdqError(str(e)) from None
        preset = PRESETS[self.layout]
        for key in PRESET_KEYS:
            if getattr(self, key) is None:
                setattr(self, key, preset[key] if preset[key] is not None else self.a_bits)
        self.reconstruct_stem = preset["reconstruct_stem"]

    def resolve(self, gm: fx.GraphModule) -> dict[str, dict[str, int]]:
        """{'weights': {layer: bits}, 'acts': {quantizer: bits}} for every quantizer of `gm`."""
        layers, acts = quant_layer_names(gm), act_quant_names(gm)
        first, first_out, last, last_in = stem_and_head(gm)
        weights = {name: self.w_bits for name in layers}
        act_bits = {name: self.a_bits for name in acts}
        weights[first], weights[last] = self.stem_w_bits, self.fc_w_bits
        if first_out is not None:
            act_bits[first_out] = self.stem_out_bits
        if last_in is not None:
            act_bits[last_in] = self.fc_in_bits
        input_aq = input_quantizer(gm)
        if input_aq is not None:
            act_bits[input_aq] = self.in_bits
        for name, bits in self.per_layer.items():
            if name in weights:
                weights[name] = bits
            elif name in act_bits:
                act_bits[name] = bits
            else:
                raise PdqError(f"quant.per_layer names {name!r}, which is no quantized layer or activation "
                               f"quantizer of this model; accepted: {', '.join(layers + acts)}")
        return {"weights": weights, "acts": act_bits}


def _parse_override(item: str) -> tuple[str, int]:
    name, sep, bits = str(item).rpartition(":")
    if not sep or not name or not bits.strip().isdigit():
        raise PdqError(f"quant.per_layer entry {item!r} is not accepted; accepted: '<layer or activation-quantizer "
                       f"name>:<bits>', e.g. layer1.0.aq:8")
    return name.strip(), int(bits)


def apply_layout(gm: fx.GraphModule, table: dict[str, dict[str, int]]) -> None:
    for name, bits in table["weights"].items():
        gm.get_submodule(name).weight_quant.bits = bits
    for name, bits in table["acts"].items():
        gm.get_submodule(name).bits = bits
