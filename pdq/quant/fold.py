"""BatchNorm folding (spec §2.1): W <- W * g / sqrt(v + eps), b <- beta + (b - mu) * g / sqrt(v + eps)."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

_BN = (nn.BatchNorm2d, nn.BatchNorm1d)
_FOLDABLE = (nn.Conv2d, nn.Linear)


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of conv/linear `layer` with `bn` (eval statistics) folded into its weight and bias."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} has no running statistics to fold")
    folded = copy.deepcopy(layer)
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    w = layer.weight * factor.reshape(-1, *([1] * (layer.weight.ndim - 1)))
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    folded.weight = nn.Parameter(w)
    folded.bias = nn.Parameter(beta + (b - bn.running_mean) * factor)
    return folded


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm whose input is a conv/linear used by nothing else; the BN node is removed."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BN):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                and isinstance(modules.get(prev.target), _FOLDABLE) and len(prev.users) == 1):
            continue
        gm.set_submodule(prev.target, fold_bn_into(modules[prev.target], modules[node.target]))
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm

