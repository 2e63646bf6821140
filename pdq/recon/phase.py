"""What one pass over the units does: its switches, loss weights and optimisers (`Phase`), and its
Distribution Correction settings (`DCConfig`). Neither has defaults: every value comes from the method's
composed config (`conf/method/_recon.yaml` and the method's own file), which is the one source."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from torch import fx

from pdq.checks import check_bool, check_choice, check_float, check_int
from pdq.errors import PdqError
from pdq.recon.units import PATTERNS, Unit, find_units

STEP_POLICIES = ("uniform", "adaptive")
#: keyword arguments of an LR scheduler that name its length in steps: they follow a unit's own steps
SCHEDULE_LENGTH_KEYS = ("T_max", "total_steps")


@dataclass
class DCConfig:
    """Distribution Correction (spec §5.3): Adam on the unit's FP input with ReduceLROnPlateau."""
    enabled: bool
    steps: int          # Adam steps per chunk
    lr: float
    lambda_c: float     # proximity weight is 1 / lambda_c
    chunk: int          # images corrected together (official code: 32)
    patience: int       # ReduceLROnPlateau
    factor: float
    min_lr: float

    def __post_init__(self):
        check_bool("method.dc.enabled", self.enabled)
        check_int("method.dc.steps", self.steps, 1 if self.enabled else 0)
        check_float("method.dc.lr", self.lr, 0, lo_open=True)
        check_float("method.dc.lambda_c", self.lambda_c, 0, lo_open=True)
        check_int("method.dc.chunk", self.chunk, 1)
        check_int("method.dc.patience", self.patience, 0)
        check_float("method.dc.factor", self.factor, 0, 1, lo_open=True, hi_open=True)
        check_float("method.dc.min_lr", self.min_lr, 0)


@dataclass
class Phase:
    """Switches and loss weights of one pass over the units (spec §1.5, §3, §4, §5)."""
    pattern: str                    # block | layer: what a unit is
    unit_merges: int                # MRECG: adjacent block units reconstructed jointly (`pdq.recon.units`)
    iters: int                      # optimisation steps per unit (`uniform`; the mean budget's unit otherwise)
    steps: str                      # uniform | adaptive: how the steps are shared among the units (`pdq.recon.steps`)
    step_budget: float              # the phase's steps, as a share of iters x units (1: every unit iters steps)
    step_bounds: tuple[float, float]  # adaptive: a unit's fewest and most steps, as shares of iters
    learn_rounding: bool            # AdaRound variables of the unit's layers
    learn_act_scale: bool           # LSQ scales of the unit's activation quantizers
    learn_weight_scale: bool        # Genie-M: the per-channel weight scales, learned with the rounding variables
    #                                 (in a phase that learns them: `learns_weight_scales`)
    act_quant: bool                 # activation quantization on while reconstructing
    drop_prob: float                # QDrop: probability an activation element is quantized (1 = always)
    input_prob: float               # probability a unit-input element comes from the quantized path
    rec_p: float                    # exponent of the reconstruction term
    round_optimizer: Callable | None    # partial optimiser of the AdaRound variables
    scale_optimizer: Callable | None    # partial optimiser of the activation scales
    weight_scale_optimizer: Callable | None  # partial optimiser of the weight scales
    scale_scheduler: Callable | None    # partial LR scheduler of the activation and the weight scales
    round_weight: float             # weight of AdaRound's rounding regulariser
    warmup: float                   # share of the steps before the rounding regulariser starts
    b_range: tuple[float, float]    # its beta, from start to end
    rec_weight: float               # weight of the reconstruction term
    pd_weight: float                # weight of PD-Quant's prediction-difference term (official: 1 / lambda_r = 10)
    temperature: float              # PD softmax temperature
    pd_branch_drop: bool            # official: dropping stays on in the PD (quantized) half
    dc: DCConfig | dict             # Distribution Correction of the FP unit inputs

    def __post_init__(self):
        self.dc = DCConfig(**self.dc) if isinstance(self.dc, dict) else self.dc
        check_choice("method.pattern", self.pattern, PATTERNS)
        check_int("method.unit_merges", self.unit_merges, 0)
        if self.unit_merges and self.pattern != "block":
            raise PdqError(f"method.unit_merges={self.unit_merges} needs method.pattern=block (it merges block "
                           f"units); accepted: unit_merges=0 with pattern={self.pattern}")
        check_int("method.iters", self.iters, 0)
        check_choice("method.steps", self.steps, STEP_POLICIES)
        if not isinstance(self.step_bounds, (list, tuple)) or len(self.step_bounds) != 2:
            raise PdqError(f"method.step_bounds={self.step_bounds!r} is not accepted; accepted: [fewest, most], two "
                           f"numbers >= 0 (shares of method.iters)")
        self.step_bounds = tuple(check_float("method.step_bounds", b, 0) for b in self.step_bounds)
        check_float("method.step_budget", self.step_budget, 0, lo_open=True)
        fewest, most = self.step_bounds
        if fewest > most or most == 0 or (self.steps == "adaptive" and not fewest <= self.step_budget <= most):
            raise PdqError(f"method.step_bounds={list(self.step_bounds)} with method.step_budget={self.step_budget} "
                           f"(method.steps={self.steps}) is not accepted; accepted: 0 <= fewest <= most, most > 0, and "
                           f"under method.steps=adaptive fewest <= step_budget <= most")
        for key in ("learn_rounding", "learn_act_scale", "learn_weight_scale", "act_quant", "pd_branch_drop"):
            check_bool(f"method.{key}", getattr(self, key))
        check_float("method.drop_prob", self.drop_prob, 0, 1)
        check_float("method.input_prob", self.input_prob, 0, 1)
        check_float("method.rec_p", self.rec_p, 0, lo_open=True)
        for key in ("round_weight", "rec_weight", "pd_weight"):
            check_float(f"method.{key}", getattr(self, key), 0)
        check_float("method.warmup", self.warmup, 0, 1, hi_open=True)
        if not isinstance(self.b_range, (list, tuple)) or len(self.b_range) != 2:
            raise PdqError(f"method.b_range={self.b_range!r} is not accepted; accepted: [start, end], two numbers > 0")
        self.b_range = tuple(check_float("method.b_range", b, 0, lo_open=True) for b in self.b_range)
        check_float("method.temperature", self.temperature, 0, lo_open=True)
        for key, lr_key, used in (("round_optimizer", "round_lr", self.learn_rounding),
                                  ("scale_optimizer", "scale_lr", self.learns_scales),
                                  ("weight_scale_optimizer", "weight_scale_lr", self.learns_weight_scales)):
            optimizer = getattr(self, key)
            if used and optimizer is None:
                raise PdqError(f"method.{key} is missing; accepted: a partial optimiser (see conf/method/_recon.yaml)")
            lr = getattr(optimizer, "keywords", {}).get("lr")
            if lr is not None:
                check_float(f"method.{lr_key}", lr, 0, lo_open=True)
        if self.trains and self.rec_weight == 0 and self.pd_weight == 0:
            raise PdqError("method.rec_weight=0 and method.pd_weight=0 leave nothing to learn from; accepted: "
                           "rec_weight > 0 or pd_weight > 0 (or learn_rounding=false and learn_act_scale=false)")

    def units(self, gm: fx.GraphModule) -> list[Unit]:
        """The units this phase visits, in order."""
        return find_units(gm, self.pattern, self.unit_merges)

    def with_steps(self, steps: int) -> Phase:
        """This phase for a unit fitted for `steps` steps instead of `iters`: the rounding schedule and the scales'
        LR schedule (its `T_max` or `total_steps`) span them, and each optimiser's `lr` keyword (only that one) is
        multiplied by iters / steps, so that Adam, whose step is about lr long, moves each variable as far in all."""
        sched = self.scale_scheduler
        for key in SCHEDULE_LENGTH_KEYS:
            sched = _with_keyword(sched, key, lambda _: steps)
        return replace(self, iters=steps, scale_scheduler=sched, **{
            name: _with_keyword(getattr(self, name), "lr", lambda lr: lr * self.iters / steps)
            for name in ("round_optimizer", "scale_optimizer", "weight_scale_optimizer")})

    @property
    def learns_scales(self) -> bool:
        return self.learn_act_scale and self.act_quant

    @property
    def learns_weight_scales(self) -> bool:
        return self.learn_weight_scale and self.learn_rounding

    @property
    def trains(self) -> bool:
        return self.learn_rounding or self.learns_scales

    @property
    def uses_pd(self) -> bool:
        return self.pd_weight > 0


PHASE_KEYS = tuple(f.name for f in fields(Phase))


def _with_keyword(partial: Callable | None, key: str, change: Callable) -> Callable | None:
    """`partial` with its keyword `key` changed by `change` (the same object where it has no such keyword)."""
    if not isinstance(partial, functools.partial) or key not in partial.keywords:
        return partial
    return functools.partial(partial.func, *partial.args, **{**partial.keywords, key: change(partial.keywords[key])})
