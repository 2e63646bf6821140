"""pdq.cache: the key (every field, torch version, device; never an object's repr), the load/validate/save path
(round trip, corrupt and older entries miss with a warning and are rewritten), the cached FP top-1, and
`pdq cache list|prune` with its bad input."""

import json
import logging
import time
from dataclasses import dataclass

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pdq.evaluate
from pdq.cache import FORMAT, describe, entry, main, scan
from pdq.quant.observers import LpObserver, MinMaxObserver, Observer

FIELDS = {"model": "m", "bits": [2, 4], "skip": {"b", "a"}, "observer": LpObserver(p=2.4), "images": torch.ones(2, 3)}


def key(fields=FIELDS, namespace="sensitivity", device="cpu"):
    return entry("/nowhere", namespace, fields, device).key


@dataclass
class Settings:
    lr: float = 0.1
    steps: int = 3


@pytest.mark.parametrize("change", [
    {"model": "other"}, {"bits": [2, 8]}, {"skip": {"a"}}, {"observer": LpObserver(p=2.0)},
    {"observer": MinMaxObserver()}, {"images": torch.ones(3, 2)}, {"images": torch.ones(2, 3, dtype=torch.float64)},
    {"images": torch.ones(2, 3).index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(1.0 + 1e-6))},
    {"extra": None},
])
def test_the_key_changes_with_every_field(change):
    assert key({**FIELDS, **change}) != key()


def test_the_key_covers_namespace_torch_version_device_and_dataclass_fields(monkeypatch):
    base = key()
    assert key() == base and key(dict(reversed(FIELDS.items()))) == base  # the order of the fields is not key
    assert key(namespace="fp_top1") != base
    assert key(device="cuda") != base and key(device=torch.device("cpu", 0)) == base  # the device type
    assert key({**FIELDS, "dc": Settings()}) != key({**FIELDS, "dc": Settings(steps=4)})
    from omegaconf import OmegaConf

    assert key({**FIELDS, "data": OmegaConf.create({"a": 1})}) == key({**FIELDS, "data": {"a": 1}})
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert key() != base
    found = entry("/nowhere", "dc", {"a": 1}, "cpu")
    assert found.fields == {"a": 1, "torch": "0.0.1", "device": "cpu"}


def test_the_key_does_not_depend_on_an_objects_repr(monkeypatch):
    base = key()
    monkeypatch.setattr(Observer, "__repr__", lambda self: "same for all")
    assert key() == base
    assert key({**FIELDS, "observer": LpObserver(p=2.0)}) != base
    assert describe(LpObserver(p=2.0)) == {"class": "pdq.quant.observers.LpObserver", "grid": 100,
                                          "chunk_elems": 2 ** 22, "max_samples": None, "seed": 0, "p": 2.0}
    with pytest.raises(TypeError, match="no cache key fields"):
        describe(lambda x: x)  # a function has no settings to describe


@pytest.mark.parametrize("namespace,value", [
    ("fp_top1", {"fp_top1": 91.25}),
    ("dc", {"x": torch.randn(4, 3, dtype=torch.float16), "info": {"dc_loss_after": 0.5}}),
])
def test_round_trip_and_metadata(tmp_path, namespace, value):
    found = entry(tmp_path, namespace, {"model": "m"}, "cpu")
    assert found.load() is None  # no entry: a plain miss
    t0 = time.time()
    found.save(value)
    back = found.load()
    if namespace == "dc":
        assert torch.equal(back["x"], value["x"]) and back["x"].dtype == torch.float16 and back["info"] == value["info"]
    else:
        assert back == value
    meta = json.loads(found.meta_path.read_text())
    assert meta["namespace"] == namespace and meta["key"] == found.key and meta["format"] == FORMAT
    assert meta["fields"] == found.fields and t0 <= meta["created"] <= time.time()
    assert sorted(p.name for p in (tmp_path / namespace).iterdir()) == sorted([found.path.name, found.meta_path.name])


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing value", "other fields", "older format",
                                    "check fails"])
def test_a_corrupt_or_mismatching_entry_is_a_miss_with_one_warning_and_is_rewritten(tmp_path, caplog, damage):
    found = entry(tmp_path, "dc", {"model": "m"}, "cpu")
    found.save({"x": torch.arange(6.0)})
    meta = json.loads(found.meta_path.read_text())
    if damage == "truncated":
        found.path.write_bytes(found.path.read_bytes()[:50])
    elif damage == "garbage":
        found.meta_path.write_text("{not json")
    elif damage == "missing value":
        found.path.unlink()
    elif damage in ("other fields", "older format"):
        meta.update({"fields": {**meta["fields"], "model": "n"}} if damage == "other fields" else {"format": 0})
        found.meta_path.write_text(json.dumps(meta))

    def check(raw):
        if damage == "check fails" or len(raw["x"]) != 6:
            raise ValueError("not 6 rows")
        return raw["x"]

    with caplog.at_level(logging.WARNING, logger="pdq"):
        assert found.load(check) is None
    warned = _warnings(caplog)
    assert len(warned) == 1 and "unreadable" in warned[0] and found.key in warned[0]
    assert len(warned[0].splitlines()) == 1
    if damage != "check fails":
        found.save({"x": torch.arange(6.0)})  # recomputed and overwritten
        assert torch.equal(found.load(check), torch.arange(6.0))


def _legacy(tmp_path):
    """Entries as older pdq wrote them: a bare value named by a shorter digest, no metadata."""
    (tmp_path / "fp_top1").mkdir(parents=True, exist_ok=True)
    (tmp_path / "fp_top1" / ("a" * 32 + ".json")).write_text(json.dumps({"fp_top1": 12.5}))
    (tmp_path / "sensitivity").mkdir(exist_ok=True)
    (tmp_path / "sensitivity" / ("b" * 40 + ".json")).write_text('{"weights": {}, "acts": {}}')
    (tmp_path / "dc").mkdir(exist_ok=True)
    torch.save({"x": torch.zeros(2), "info": {}}, tmp_path / "dc" / ("c" * 40 + ".pt"))


def tiny_eval():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    loader = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))), batch_size=8)
    return model, loader


def test_fp_top1_is_cached_and_older_entries_miss_cleanly(tmp_path, caplog, monkeypatch):
    _legacy(tmp_path)
    model, loader = tiny_eval()
    calls = []
    evaluate = pdq.evaluate.evaluate
    monkeypatch.setattr(pdq.evaluate, "evaluate", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    kw = dict(cache_dir=tmp_path, model_name="tiny", data={"eval_subset": 20})
    with caplog.at_level(logging.WARNING, logger="pdq"):
        first = pdq.evaluate.fp_top1(model, loader, torch.device("cpu"), **kw)
    assert calls == [1] and not _warnings(caplog)  # the older entries are neither read nor warned about
    assert first == evaluate(model, loader, torch.device("cpu"))  # caching never changes the figure
    assert pdq.evaluate.fp_top1(model, loader, torch.device("cpu"), **kw) == first and calls == [1]
    assert pdq.evaluate.fp_top1(model, loader, torch.device("cpu"), **{**kw, "data": {"eval_subset": 10}}) == first
    assert calls == [1, 1]  # another data config: another entry
    assert pdq.evaluate.fp_top1(model, loader, torch.device("cpu"), **{**kw, "cache_dir": None}) == first
    assert calls == [1, 1, 1]  # no cache

    class OtherRank:  # a DDP rank other than 0: rank 0's answer, no file read or written
        main, enabled = False, True

        def broadcast(self, obj):
            assert obj is None
            return 55.0

    before = sorted(tmp_path.rglob("*"))
    assert pdq.evaluate.fp_top1(model, loader, torch.device("cpu"), **{**kw, "dist": OtherRank()}) == 55.0
    assert sorted(tmp_path.rglob("*")) == before


def _entries(tmp_path, ages):
    """One entry per (namespace, age in seconds), its creation time set `age` seconds ago."""
    now = time.time()
    for i, (namespace, age) in enumerate(ages):
        found = entry(tmp_path, namespace, {"model": f"m{i}", "images": torch.ones(2, 3)}, "cpu")
        found.save({"x": torch.zeros(10)} if namespace == "dc" else {"fp_top1": 1.0})
        meta = json.loads(found.meta_path.read_text())
        found.meta_path.write_text(json.dumps({**meta, "created": now - age}))


def test_list_prints_every_entry_and_a_total(tmp_path, capsys):
    _entries(tmp_path, [("fp_top1", 3600), ("dc", 10 * 86400), ("sensitivity", 60)])
    _legacy(tmp_path)
    (tmp_path / "dc" / ".x.pt.123.tmp").write_bytes(b"a write under way")
    assert main(["list", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and lines[-1].startswith("total: 6 entries")
    assert lines[0].split()[0] == "dc" and "10.0d" in lines[0] and "model=m1" in lines[0]
    assert "images=2x3" in lines[0] and "device=cpu" in lines[0]
    assert sum("no metadata" in line for line in lines) == 3
    assert main(["list", "--cache-dir", str(tmp_path), "--namespace", "dc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("dc") for line in lines[:-1])


def test_prune_removes_old_entries_or_a_namespace_whole(tmp_path, capsys):
    _entries(tmp_path, [("fp_top1", 3600), ("dc", 10 * 86400), ("sensitivity", 8 * 86400), ("dc", 60)])
    assert main(["prune", "--older-than", "7d", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[-1].startswith("removed: 2 entries")
    assert all(line.startswith("removed ") for line in out[:2])
    assert sorted((s.namespace, s.fields["model"]) for s in scan(tmp_path)) == [("dc", "m3"), ("fp_top1", "m0")]
    assert len(list((tmp_path / "dc").iterdir())) == 2  # the young entry's value and metadata, nothing else
    assert main(["prune", "--older-than", "12h", "--cache-dir", str(tmp_path)]) == 0
    assert "removed: 0 entries" in capsys.readouterr().out
    assert main(["prune", "--namespace", "dc", "--cache-dir", str(tmp_path)]) == 0
    assert "removed: 1 entry," in capsys.readouterr().out
    assert not list((tmp_path / "dc").iterdir()) and [s.namespace for s in scan(tmp_path)] == ["fp_top1"]
    _legacy(tmp_path)
    assert main(["prune", "--older-than", "0s", "--cache-dir", str(tmp_path)]) == 0
    assert "removed: 4 entries" in capsys.readouterr().out and scan(tmp_path) == []


@pytest.mark.parametrize("args,message", [
    (["list", "--namespace", "fp"], "--namespace='fp' is unknown; accepted: fp_top1, dc, sensitivity"),
    (["prune", "--older-than", "7x"], "--older-than='7x' is not accepted; accepted: a number and a unit"),
    (["prune", "--older-than=-1d"], "--older-than='-1d' is not accepted"),
    (["list", "--cache-dir", "MISSING"], "is not a directory; accepted: an existing cache dir"),
    (["prune"], "removes nothing without a selection; accepted: --older-than DURATION"),
])
def test_bad_input_is_one_clear_message(tmp_path, capsys, args, message):
    _entries(tmp_path, [("dc", 10 * 86400)])
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in args]
    if "--cache-dir" not in args:
        args += ["--cache-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("pdq cache: error:") and len(err.splitlines()) == 1
    assert len(scan(tmp_path)) == 1  # nothing removed
