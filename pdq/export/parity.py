"""What the parity checks of an exported model (tests, benchmarks/export.py) compare: the logits onnxruntime gives
(`onnx_logits`), and the unit of the tolerance on their difference from pdq's (`head_step`)."""

from __future__ import annotations

import torch
from torch import fx

from pdq.quant.graph import stem_and_head


def head_step(gm: fx.GraphModule) -> float:
    """How far one quantization step of every element of the classifier's input can move a logit:
    s_in * max_j sum_i |W_ji| (the unit of the parity tolerance)."""
    _, _, last, last_in = stem_and_head(gm)
    fc = gm.get_submodule(last)
    return float(gm.get_submodule(last_in).scale) * fc.weight_quant(fc.weight).abs().sum(1).max().item()


def onnx_logits(sess, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The logits of an onnxruntime session (`pdq.export.runtime.session`) for `images`, `batch_size` at a time."""
    name = sess.get_inputs()[0].name
    return torch.cat([torch.from_numpy(sess.run(None, {name: images[i:i + batch_size].numpy()})[0])
                      for i in range(0, len(images), batch_size)])
