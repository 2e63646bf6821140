"""Every option of every config group composes with the real conf/ and instantiates."""


import lightning as L
import pytest
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from pdq.config import compose as compose_pdq
from pdq.config import hydra_initialized, resolvers
from pdq.errors import PdqError, instantiate
from pdq.loggers import close_logger
from pdq.mixed import MixedLayout
from pdq.quant import BitLayout
from tests.conftest import CONF


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_default_config(make_cfg):
    cfg = make_cfg()
    assert (cfg.model.name, cfg.method.name, cfg.quant.w_bits, cfg.quant.a_bits) == ("resnet20_fmnist", "pdquant", 4, 4)
    assert cfg.calib.size == 1024 and cfg.calib.batch_size == 32


@pytest.mark.parametrize("name", options("model"))
def test_model_configs(make_cfg, name):
    overrides = [f"model={name}"] + (["model.name=resnet18"] if name == "torchvision" else [])
    cfg = make_cfg(*overrides)
    if name == "custom":  # a user's class or factory by its dotted path
        with pytest.raises(PdqError, match="model=custom needs model.target="):
            instantiate(cfg.model)
        cfg = make_cfg(*overrides, "model.target=torchvision.models.resnet18", "model.kwargs={num_classes: 10}")
        assert instantiate(cfg.model).fc.out_features == 10
    elif name.endswith("_fmnist"):
        assert isinstance(instantiate(cfg.model), nn.Module)
    else:  # torchvision models refuse to quantize random weights
        with pytest.raises(PdqError, match="needs trained weights"):
            instantiate(cfg.model)
        assert isinstance(instantiate(cfg.model, pretrained=False), nn.Module)


@pytest.mark.parametrize("name", options("method"))
def test_method_configs(make_cfg, name):
    method = instantiate(make_cfg(f"method={name}").method)
    assert method.name == name and callable(method.quantize)


@pytest.mark.parametrize("name", options("quant"))
def test_quant_presets(make_cfg, name):
    layout = instantiate(make_cfg(f"quant={name}").quant, _convert_="all")
    assert isinstance(layout, BitLayout)
    if name == "mixed":  # widths chosen per layer under a budget, which the run must be given
        assert isinstance(layout, MixedLayout) and layout.budget_key is None
    else:
        assert name == f"w{layout.w_bits}a{layout.a_bits}"


def test_data_configs(make_cfg, tmp_path):
    dm = instantiate(make_cfg("data=fashion_mnist").data)
    assert dm.train_size == 60000
    (tmp_path / "train" / "c").mkdir(parents=True)
    (tmp_path / "val" / "c").mkdir(parents=True)
    dm = instantiate(make_cfg("data=imagenet", f"data.root={tmp_path}").data)
    dm.prepare_data()  # folders exist: accepted


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(make_cfg, name):
    factory = instantiate(make_cfg(f"trainer={name}").trainer)
    if name == "cpu":
        assert isinstance(factory(max_steps=1, logger=False, enable_progress_bar=False), L.Trainer)
    else:
        assert callable(factory)


@pytest.mark.parametrize("name", options("trainer"))
def test_every_trainer_sets_what_pdq_reads(make_cfg, name):
    """accelerator, devices, strategy, num_nodes and the log cadence come from conf/trainer, for run.py and for
    pdq.quantize alike: the code reads them with no default of its own."""
    from pdq.api import compose as api_compose

    trainer = make_cfg(f"trainer={name}").trainer
    assert trainer.accelerator in ("cpu", "gpu")
    assert {"devices", "strategy", "num_nodes", "log_every_n_steps"} <= set(trainer)
    assert api_compose("pdquant", "w4a4", {"trainer": name})[0].trainer == trainer


@pytest.mark.parametrize("name", options("logger"))
def test_logger_configs(make_cfg, name, tmp_path):
    cfg = make_cfg(f"logger={name}")
    with resolvers():
        logger = instantiate(cfg.logger) if cfg.logger else None
    if name == "none":
        assert logger is None
        return
    logger.log_metrics({"x": 1.0}, step=1)
    close_logger(logger, ok=True)
    if name == "csv":
        assert any(tmp_path.rglob("metrics.csv"))
    else:  # wandb: offline, its run dir lands in the run's output dir
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
        assert logger.experiment.name == "resnet20_fmnist_pdquant_w4a4_s1005"


@pytest.mark.parametrize("name", options("debug"))
def test_debug_configs(make_cfg, name):
    assert make_cfg(f"debug={name}").calib.size < 1024


RECONSTRUCTION = [m for m in options("method") if not m.startswith("rtn_")]


@pytest.mark.parametrize("name", RECONSTRUCTION)
def test_every_phase_fits_with_the_composed_learning_rates_and_steps(make_cfg, name):
    """One source per setting: the optimisers a unit's fit builds use the composed method's round_lr, scale_lr and
    weight_scale_lr (with learn_weight_scale=true), and the scale schedule spans the phase's steps (BRECQ's
    activation phase: act_iters)."""
    import torch

    from pdq.recon.module import UnitReconstruction

    base = [f"method={name}", "method.iters=7", *(["method.act_iters=5"] if name == "brecq" else [])]
    rounding = any(p.learn_rounding for p in instantiate(make_cfg(*base).method).phases)
    cfg = make_cfg(*base, f"method.learn_weight_scale={rounding}")
    method = instantiate(cfg.method)
    for i, phase in enumerate(method.phases):
        ada = type("Ada", (nn.Module,), {"learns_scale": True})()
        ada.alpha, ada.scale = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(3))
        module = UnitReconstruction(nn.Identity(), None, phase, adarounds=[ada] if phase.learn_rounding else [],
                                    scales=[nn.Parameter(torch.ones(()))] if phase.learns_scales else [],
                                    mask_generator=torch.Generator(), log_prefix="u", step_offset=0,
                                    suffix=nn.Identity())
        opts, scheds = module.configure_optimizers()
        lrs = ([cfg.method.round_lr] if phase.learn_rounding else []) + ([cfg.method.scale_lr] if phase.learns_scales
                                                                          else [])
        lrs += [cfg.method.weight_scale_lr] if phase.learn_rounding else []
        assert [o.param_groups[0]["lr"] for o in opts] == lrs and lrs, (name, i)
        assert module.optimizer_names == [k for k, on in (("round", phase.learn_rounding),
                                                          ("scale", phase.learns_scales),
                                                          ("weight_scale", phase.learn_rounding)) if on]
        assert [s.T_max for s in scheds] == [phase.iters] * (phase.learns_scales + phase.learn_rounding)
        assert phase.iters == (5 if (name, i) == ("brecq", 1) else 7)
        assert phase.temperature == cfg.model.ptq.temperature and phase.round_weight == cfg.model.ptq.round_weight
        assert phase.dc.lambda_c == cfg.model.ptq.lambda_c and phase.dc.steps == cfg.model.ptq.dc_steps
    sgd = instantiate(make_cfg(f"method={name}", "method.round_optimizer._target_=torch.optim.SGD").method)
    assert all(isinstance(p.round_optimizer([nn.Parameter(torch.zeros(1))]), torch.optim.SGD) for p in sgd.phases)


@pytest.mark.parametrize("name", options("method"))
def test_an_unknown_method_key_is_one_error_naming_it(make_cfg, name):
    with pytest.raises(PdqError, match=r"iter=5 is not a setting of .*; accepted: .*(iters|weight_observer)"):
        instantiate(make_cfg(f"method={name}", "++method.iter=5").method)


@pytest.mark.parametrize("override,message", [
    ("method.iters=-5", "method.iters=-5 .*an integer >= 0"),
    ("method.iters=2.5", "method.iters=2.5 .*an integer"),
    ("method.temperature=0", "method.temperature=0 .*> 0"),
    ("method.pd_weight=-1", "method.pd_weight=-1 .*>= 0"),
    ("method.drop_prob=1.5", r"method.drop_prob=1.5 .*\[0, 1\]"),
    ("method.input_prob=-0.1", r"method.input_prob=-0.1 .*\[0, 1\]"),
    ("method.dc.steps=-1", "method.dc.steps=-1 .*>= 1"),
    ("method.dc.chunk=0", "method.dc.chunk=0 .*>= 1"),
    ("method.dc.lambda_c=inf", "method.dc.lambda_c=inf .*finite"),
    ("method.round_lr=nan", "method.round_lr=nan .*finite"),
    ("method.scale_lr=0", "method.scale_lr=0 .*> 0"),
    ("method.warmup=1.0", r"method.warmup=1.0 .*\[0, 1\)"),
    ("method.b_range=[20]", "method.b_range=.*two numbers"),
    ("method.pattern=blocks", "method.pattern='blocks' .*block, layer"),
    ("method.unit_merges=-1", "method.unit_merges=-1 .*>= 0"),
    ("method.step_budget=0", "method.step_budget=0 .*> 0"),
    ("method.steps=fast", "method.steps='fast' .*uniform, adaptive"),
    ("method.learn_rounding=2", "method.learn_rounding=2 .*true or false"),
    ("method.learn_weight_scale=yes", "method.learn_weight_scale='yes' .*true or false"),
    ("method.weight_scale_lr=0", "method.weight_scale_lr=0 .*> 0"),
    ("method.weight_observer.p=0", "p=0 .*> 0"),
    ("method.act_observer.grid=0", "grid=0 .*>= 1"),
    ("method.act_observer.max_samples=-3", "max_samples=-3 .*>= 1"),
])
def test_bad_method_values_are_one_error(make_cfg, override, message):
    with pytest.raises(PdqError, match=message):
        instantiate(make_cfg("method=pdquant", override).method)


def test_learned_weight_scales_need_the_rounding_variables(make_cfg):
    with pytest.raises(PdqError, match="learn_weight_scale=true needs a phase with method.learn_rounding=true.*acc"):
        instantiate(make_cfg("method=qdrop", "method.learn_weight_scale=true", "method.learn_rounding=false").method)


def test_nothing_to_learn_from_is_refused_up_front(make_cfg):
    with pytest.raises(PdqError, match="rec_weight=0 and method.pd_weight=0 leave nothing to learn from"):
        instantiate(make_cfg("method=qdrop", "method.rec_weight=0").method)
    # with nothing learned, both weights may be 0
    instantiate(make_cfg("method=qdrop", "method.rec_weight=0", "method.learn_rounding=false",
                         "method.learn_act_scale=false").method)


EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for group in ("paper", "embedded") for p in (CONF / "experiment" / group).glob("*.yaml"))
PARETO = sorted(p.stem for p in (CONF / "experiment" / "pareto").glob("*.yaml"))


def test_experiment_grid_is_complete():
    """Six paper models and the two reference models, each at W4A4, W2A4, W4A2 and W2A2; the Pareto points."""
    cells = [f"{w}" for w in ("w4a4", "w2a4", "w4a2", "w2a2")]
    paper = ["resnet18_brecq", "resnet50_brecq", "mobilenetv2_brecq", "regnetx_600m", "regnetx_3200m", "mnasnet_x2"]
    expected = {f"paper/{m}_{c}" for m in paper for c in cells}
    expected |= {f"embedded/{m}_{c}" for m in ("resnet20_fmnist", "mobilenetv2_fmnist") for c in cells}
    assert set(EXPERIMENTS) == expected
    assert sorted(p.name for p in (CONF / "experiment").iterdir() if p.is_dir()) == ["embedded", "paper", "pareto"]
    assert set(PARETO) == {"w2a4", "w3a4", "w4a4", "w8a4", "mixed_avg2.5a4", "mixed_avg3a4", "mixed_avg4a4"}


@pytest.mark.parametrize("name", PARETO)
def test_pareto_experiments_set_only_the_bits(make_cfg, name):
    """A Pareto point sets the bits (uniform) or the budget (mixed), A4, and leaves model and method to the user."""
    cfg = make_cfg(f"experiment=pareto/{name}", "model=mobilenetv2_fmnist", "method=rtn_mse")
    assert (cfg.model.name, cfg.method.name, cfg.quant.a_bits) == ("mobilenetv2_fmnist", "rtn_mse", 4)
    layout = instantiate(cfg.quant, _convert_="all")
    if name.startswith("mixed_avg"):
        assert (layout.budget_key, layout.budget_value) == ("avg_w_bits", float(name[9:-2]))
        assert layout.label == f"mixed avg_w_bits={name[9:-2]} A4"
    else:
        assert layout.label == name.upper() and not hasattr(layout, "budget")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs(make_cfg, name):
    model, bits = name.split("/")[1].rsplit("_", 1)
    cfg = make_cfg(f"experiment={name}", "data.root=/data/imagenet")
    assert (cfg.model.name, cfg.method.name, f"w{cfg.quant.w_bits}a{cfg.quant.a_bits}") == (model, "pdquant", bits)
    assert (cfg.calib.size, cfg.calib.batch_size, cfg.seed) == (1024, 32, 1005)
    assert cfg.method.iters == cfg.model.ptq.iters == (20000 if name.startswith("paper/") else 200)
    assert cfg.method.dc.lambda_c == cfg.model.ptq.lambda_c and cfg.method.temperature == cfg.model.ptq.temperature
    assert cfg.data._target_.endswith("ImageNetDataModule" if name.startswith("paper/") else "FashionMNISTDataModule")
    baseline = make_cfg(f"experiment={name}", "method=qdrop", "seed=3", "data.root=/data/imagenet")
    assert (baseline.method.name, baseline.model.name, baseline.seed) == ("qdrop", model, 3)


#: The PD-Quant paper's grid as the official code ran it (shared/spec/algorithms.md §5.3-5.4: the defaults table
#: and run_script's per-model values; Table 3: six models x W4A4, W2A4, W4A2, W2A2), and the embedded cells
#: (the Fashion-MNIST reference models at the same settings, 200 steps per unit and 50 DC steps for the CPU).
#: Written out here, not read from conf/, so that a config refactor that changes a value fails.
RECIPE = {
    "seed": 1005, "calib.size": 1024, "calib.batch_size": 32, "calib.act_init_size": 256,
    "method.name": "pdquant", "method._target_": "pdq.methods.Reconstruction", "method.pattern": "block",
    "method.learn_rounding": True, "method.learn_act_scale": True, "method.act_quant": True,
    "method.round_lr": 3e-3, "method.scale_lr": 4e-5, "method.round_optimizer.lr": 3e-3,
    "method.scale_optimizer.lr": 4e-5, "method.scale_scheduler.eta_min": 0.0,
    "method.rec_weight": 1.0, "method.rec_p": 2.0, "method.pd_weight": 10.0,  # 1 / lambda_r, lambda_r = 0.1
    "method.drop_prob": 0.5, "method.input_prob": 0.5, "method.pd_branch_drop": True,
    "method.warmup": 0.2, "method.b_range": [20.0, 2.0],
    "method.dc.enabled": True, "method.dc.lr": 1e-3, "method.dc.patience": 100, "method.dc.factor": 0.1,
    "method.dc.min_lr": 1e-5,
    "method.weight_observer.p": 2.4, "method.act_observer.p": 2.4,
    "quant.layout": "pdquant", "quant.backend": "academic", "quant.per_layer": [],
}
#: (round-loss weight, temperature T, lambda_c) per family (§5.3 lambda_c, §5.4 run_script)
FAMILIES = {"resnet": (0.01, 4.0, 0.02), "mobilenet": (0.1, 1.0, 0.005), "regnet": (0.01, 4.0, 0.01),
            "mnasnet": (0.2, 1.0, 0.001)}
PAPER_MODELS = {"resnet18_brecq": "resnet", "resnet50_brecq": "resnet", "mobilenetv2_brecq": "mobilenet",
                "regnetx_600m": "regnet", "regnetx_3200m": "regnet", "mnasnet_x2": "mnasnet"}
EMBEDDED_MODELS = {"resnet20_fmnist": "resnet", "mobilenetv2_fmnist": "mobilenet"}
GRID_BITS = {"w4a4": (4, 4), "w2a4": (2, 4), "w4a2": (4, 2), "w2a2": (2, 2)}


def expected_cell(group: str, model: str, bits: str) -> dict:
    """Every value that matters of experiment `group/model_bits`, as dotted keys of the composed config."""
    family = (PAPER_MODELS if group == "paper" else EMBEDDED_MODELS)[model]
    round_weight, temperature, lambda_c = FAMILIES[family]
    iters, dc_steps = (20000, 500) if group == "paper" else (200, 50)
    data = "pdq.data.ImageNetDataModule" if group == "paper" else "pdq.data.FashionMNISTDataModule"
    return {**RECIPE, "model.name": model, "data._target_": data,
            "quant.w_bits": GRID_BITS[bits][0], "quant.a_bits": GRID_BITS[bits][1],
            "method.iters": iters, "model.ptq.iters": iters, "method.scale_scheduler.T_max": iters,
            "method.dc.steps": dc_steps, "model.ptq.dc_steps": dc_steps,
            "method.round_weight": round_weight, "model.ptq.round_weight": round_weight,
            "method.temperature": temperature, "model.ptq.temperature": temperature,
            "method.dc.lambda_c": lambda_c, "model.ptq.lambda_c": lambda_c}


GRID = {f"{group}/{model}_{bits}": expected_cell(group, model, bits)
        for group, models in (("paper", PAPER_MODELS), ("embedded", EMBEDDED_MODELS))
        for model in models for bits in GRID_BITS}


def test_the_grid_is_every_experiment_file():
    assert set(GRID) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(GRID))
def test_every_experiment_composes_to_the_paper_grid(make_cfg, name):
    """Each experiment, composed with the real conf/ (its model file and family base, the method, the bit preset
    and the top-level defaults), has the grid's model, method, bits, calibration sizes, steps, learning rates
    and loss weights; the method built from it too."""
    from omegaconf import OmegaConf

    cfg = make_cfg(f"experiment={name}", "data.root=/data/imagenet")
    expected = GRID[name]
    composed = {key: OmegaConf.select(cfg, key) for key in expected}
    assert {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in composed.items()} == expected
    method = instantiate(cfg.method)
    (phase,) = method.phases
    assert (phase.iters, phase.round_weight, phase.temperature, phase.dc.lambda_c, phase.dc.steps) == tuple(
        expected[f"method.{k}"] for k in ("iters", "round_weight", "temperature", "dc.lambda_c", "dc.steps"))
    layout = instantiate(cfg.quant, _convert_="all")
    assert (layout.w_bits, layout.a_bits, layout.stem_w_bits, layout.fc_w_bits, layout.fc_in_bits) == (
        expected["quant.w_bits"], expected["quant.a_bits"], 8, 8, 8)


def test_experiment_and_model_files_carry_only_what_differs():
    """An experiment file names its cell (model, data, bits): the method and calibration set are conf/config.yaml's.
    A model file sets no PTQ value: those come from `_base` and its family's base (`_mobilenet`, ...)."""
    from omegaconf import OmegaConf

    for name in EXPERIMENTS:
        raw = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"))
        model, bits = name.split("/")[1].rsplit("_", 1)
        data = "imagenet" if name.startswith("paper/") else "fashion_mnist"
        assert raw == {"defaults": [{"override /model": model}, {"override /data": data},
                                    {"override /quant": bits}]}, name
    for path in (CONF / "model").glob("*.yaml"):
        if not path.stem.startswith("_"):
            assert "ptq" not in OmegaConf.load(path), path.name


def test_wandb_group_is_the_sweep_dir_in_a_multirun(make_cfg, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    cfg = make_cfg("logger=wandb", "method=qdrop", "quant=w2a2", "seed=4")
    with resolvers():
        assert cfg.logger.group == "resnet20_fmnist_qdrop_w2a2"  # a single run
        assert list(cfg.logger.tags) == ["resnet20_fmnist", "qdrop", "w2a2", "seed4"]
        job = OmegaConf.create({"mode": RunMode.MULTIRUN,
                                "runtime": {"output_dir": "/w/outputs/multiruns/d/t/3_job", "cwd": "/w"}})
        monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: job))
        assert cfg.logger.group == "outputs/multiruns/d/t"  # every job of the sweep: one group
    assert not OmegaConf.has_resolver("pdq.sweep_group")  # registered only inside the block


@pytest.mark.parametrize("name,target", [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs(name, target):
    GlobalHydra.instance().clear()
    cfg = compose_pdq([f"launcher={name}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_multi_node_slurm_launcher_follows_the_trainer():
    """launcher=slurm_ddp asks SLURM for trainer.num_nodes nodes with one task and one GPU per device."""
    GlobalHydra.instance().clear()
    cfg = compose_pdq(["launcher=slurm_ddp", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert (cfg.trainer.strategy, cfg.trainer.accelerator) == ("ddp", "gpu")


def sweep_jobs(name: str) -> tuple[object, list[list[str]]]:
    """(composed config of `sweep=<name>`, every job's overrides) as Hydra's basic sweeper expands them."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    GlobalHydra.instance().clear()
    with hydra_initialized():
        cfg = compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        params = parser.parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [f"{o.get_key_element()}={o.get_value_element_as_str()}"] for o in params]
    return cfg, [list(job) for job in itertools.product(*axes)]


PAPER_CELLS = {"W4A4", "W2A4", "W4A2", "W2A2"}


@pytest.mark.heavy  # composes every job of each named sweep (480 for table3)
@pytest.mark.parametrize("name,jobs,models,methods,bits,seeds,iters,calib", [
    ("embedded", 120, {"resnet20_fmnist", "mobilenetv2_fmnist"}, {"rtn_mse", "adaround", "brecq", "qdrop", "pdquant"},
     PAPER_CELLS, {1, 2, 3}, 100, 256),
    ("table3", 480, {"resnet18_brecq", "resnet50_brecq", "mobilenetv2_brecq", "regnetx_600m", "regnetx_3200m",
                     "mnasnet_x2"}, {"pdquant", "qdrop"}, PAPER_CELLS, set(range(10)), 20000, 1024),
    ("ablation", 200, {"resnet18_brecq", "mobilenetv2_brecq"}, {"qdrop", "pd_only", "pd_reg", "qdrop_dc", "pdquant"},
     {"W2A2", "W4A2"}, set(range(10)), 20000, 1024),
    ("pareto", 84, {"resnet20_fmnist", "mobilenetv2_fmnist"}, {"rtn_mse", "pdquant"},
     {"W2A4", "W3A4", "W4A4", "W8A4", *(f"mixed avg_w_bits={b} A4" for b in ("2.5", "3", "4"))}, {1, 2, 3}, 100, 256),
])
def test_named_sweeps_expand_to_their_tables_jobs(make_cfg, name, jobs, models, methods, bits, seeds, iters, calib):
    """`python run.py sweep=<name>` is a multirun (no -m) into a fixed dir that resumes when run again; every
    job composes, with the table's model, bits (or mixed budget), method, seed, steps and calibration size."""
    cfg, expanded = sweep_jobs(name)
    assert (str(cfg.hydra.mode), cfg.hydra.sweep.dir, cfg.resume) == ("RunMode.MULTIRUN", f"outputs/sweeps/{name}",
                                                                      "auto")
    assert len(expanded) == jobs

    def seed(job):
        return int(next(o for o in job if o.startswith("seed=")).split("=")[1])

    seen = set()
    for job in expanded:
        if seed(job) != seed(expanded[0]):  # the first seed only: one composition per cell keeps this test quick
            continue
        c = make_cfg(f"sweep={name}", *job, "data.root=/data/imagenet")
        seen.add((c.model.name, c.method.name, instantiate(c.quant, _convert_="all").label))
        assert c.method.get("iters", iters) == iters and c.calib.size == calib and c.resume == "auto"
    assert {s[0] for s in seen} == models and {s[1] for s in seen} == methods and {s[2] for s in seen} == bits
    assert len(seen) == jobs // len(seeds)
    assert {seed(j) for j in expanded} == seeds
