import shutil

import pytest
import torch
import torchvision

from pdq.data import FashionMNISTDataModule
from pdq.errors import PdqError
from pdq.evaluate import evaluate
from pdq.models import build_model
from pdq.models.fmnist import resnet20_fmnist
from pdq.models.registry import CHECKPOINT_DIR, load_state_dict

TARGETS = {"resnet20_fmnist": 92.0, "mobilenetv2_fmnist": 91.0}


@pytest.mark.heavy  # an accuracy bar on the full test split
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bundled_checkpoint_reaches_target_on_real_test_split(name):
    model = build_model(name)
    top1 = evaluate(model, FashionMNISTDataModule().test_dataloader(), torch.device("cpu"))
    assert top1 >= TARGETS[name]


def test_sha256_mismatch_is_reported(tmp_path):
    path = tmp_path / "resnet20_fmnist.pt"
    shutil.copy(CHECKPOINT_DIR / "resnet20_fmnist.pt", path)
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  resnet20_fmnist.pt\n")
    with pytest.raises(PdqError, match="is corrupt: SHA-256"):
        load_state_dict(path, verify_sha256=True)
    assert "conv1.weight" in load_state_dict(path)  # without verification the file itself is fine


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PdqError, match="is corrupt or not a PyTorch checkpoint"):
        build_model("resnet20_fmnist", checkpoint=str(garbage))
    other = tmp_path / "r18.pt"
    torch.save({"model": torchvision.models.resnet18().state_dict()}, other)
    with pytest.raises(PdqError, match="does not fit ResNet20"):
        build_model("resnet20_fmnist", checkpoint=str(other))
    ddp = tmp_path / "ddp.pt"
    state = resnet20_fmnist().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ddp)
    loaded = build_model("resnet20_fmnist", checkpoint=str(ddp))
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])


def test_torchvision_models_need_weights_or_checkpoint(tmp_path):
    with pytest.raises(PdqError, match="needs trained weights: model.weights="):
        build_model("resnet18")
    with pytest.raises(PdqError, match="is not a weights enum of resnet18; accepted: IMAGENET1K_V1"):
        build_model("resnet18", weights="NOPE")
    ckpt = tmp_path / "r18.pth.tar"
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), ckpt)
    model = build_model("resnet18", checkpoint=str(ckpt))
    assert torch.equal(model.fc.weight, ref.fc.weight) and not model.training


def test_unknown_model_lists_accepted_names():
    with pytest.raises(PdqError, match="unknown model 'resnet9000'; accepted: mobilenetv2_fmnist, resnet20_fmnist"):
        build_model("resnet9000")
