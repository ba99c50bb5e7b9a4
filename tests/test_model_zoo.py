"""Every covered model family, by name: builds, trains a step, round-trips a checkpoint,
exports to ONNX with parity; local weights in torchvision and timm formats, .pth and
.safetensors; the small-input stem; the unknown-name error."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fer.export.export import export_checkpoint
from fer.train.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from fer.train.config import TrialConfig, apply_overrides
from fer.train.models import build_model, first_conv_name, resolve_model
from support import saved_and_loaded, untimed

CLASSES = ["a", "b", "c"]

# name -> (zoo it resolves to, image size it is tested at). A ViT needs a side its patch
# divides (16 | 32); the rest run at FER's 48 px.
FAMILIES = {
    "resnet18": ("ours", 48),  # torchvision weights layout, our dropout head
    "resnet10t": ("timm", 48),
    "densenet121": ("timm", 48),
    "efficientnet_b0": ("ours", 48),
    "efficientnet_v2_s": ("torchvision", 48),  # timm spells it efficientnetv2_s
    "convnext_atto": ("timm", 48),
    "mobilenet_v3_small": ("ours", 48),
    "mobilenetv3_small_050": ("timm", 48),
    "shufflenet_v2_x0_5": ("torchvision", 48),
    "vit_tiny_patch16_224": ("timm", 32),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_checkpoints_and_exports(name, tmp_path):
    zoo, size = FAMILIES[name]
    assert resolve_model(name)[0] == zoo
    cfg = TrialConfig(model=name, image_size=size, amp=False, dropout=0.1)
    model = build_model(name, 3, in_channels=1, dropout=0.1, image_size=size)
    assert model.get_submodule(first_conv_name(model)).in_channels == 1

    # one optimizer step changes the weights and gives a finite loss
    x = torch.randn(4, 1, size, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    # checkpoint round trip: rebuilt from the checkpoint's config alone, same outputs
    ckpt = make_checkpoint(model.state_dict(), cfg, CLASSES, [4, 3, 2], epoch=1, stage="teacher",
                           metrics={}, in_channels=1)
    path = save_checkpoint(ckpt, tmp_path / "best.pt")
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))

    # ONNX with parity on raw uint8 pixels
    images, labels = _images(64, size)
    card = export_checkpoint(path, str(tmp_path / "export"), images=images, labels=labels, latency_runs=1)
    assert card["parity"]["passed"], card["parity"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "resnet10t"])
def test_small_stem_keeps_resolution(name):
    standard = build_model(name, 3, image_size=48)
    small = build_model(name, 3, image_size=48, stem="small")
    assert small.get_submodule(first_conv_name(small)).stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in list(small.modules())[:12])
    # same parameters, so the same weight files load into either
    assert {k: v.shape for k, v in standard.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    with torch.no_grad():
        assert small.eval()(torch.randn(2, 1, 48, 48)).shape == (2, 3)


def test_small_stem_refuses_patch_embeddings():
    with pytest.raises(ValueError, match=r"stem=small: convnext_atto's stem is a 4x4 stride-4 patch embedding"):
        build_model("convnext_atto", 3, stem="small")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_format_weights_load_from_a_local_file(tmp_path, suffix):
    import timm

    source = timm.create_model("resnet10t", num_classes=1000)  # ImageNet-shaped, RGB, random
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    model = build_model("resnet10t", 3, in_channels=1, pretrained=str(path))
    ref, got = source.state_dict(), model.state_dict()
    stem = first_conv_name(model) + ".weight"
    torch.testing.assert_close(got[stem], ref[stem].sum(dim=1, keepdim=True))  # RGB kernels summed
    torch.testing.assert_close(got["layer3.0.conv1.weight"], ref["layer3.0.conv1.weight"])
    assert got["fc.weight"].shape == (3, 512)  # a new head for 3 classes


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_format_weights_load_from_a_local_file(tmp_path, suffix):
    from torchvision import models as tvm

    source = tvm.shufflenet_v2_x0_5(weights=None)
    path = tmp_path / f"shufflenet{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = build_model("shufflenet_v2_x0_5", 3, in_channels=3, pretrained=str(path))
    ref, got = source.state_dict(), model.state_dict()
    torch.testing.assert_close(got["stage2.0.branch1.0.weight"], ref["stage2.0.branch1.0.weight"])
    assert got["fc.weight"].shape == (3, 1024)


def test_vit_weights_load_at_another_image_size(tmp_path):
    import timm

    source = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    # 224 px weights into a 32 px ViT: timm resamples the position embedding to 2x2 tokens
    model = build_model("vit_tiny_patch16_224", 3, in_channels=1, pretrained=str(path), image_size=32)
    assert model.pos_embed.shape[1] == 1 + 4
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_weights_of_another_architecture_are_one_line(tmp_path):
    import timm

    path = tmp_path / "wrong.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), str(path))
    with pytest.raises(ValueError, match=r"wrong.safetensors.*does not fit timm model 'densenet121'") as err:
        build_model("densenet121", 3, pretrained=str(path))
    assert "\n" not in str(err.value)


def test_corrupt_safetensors_is_one_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"bad.safetensors.*cannot be read as a weights-only state dict") as err:
        build_model("resnet10t", 3, pretrained=str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name, close", [
    ("resnet_18", "resnet18"), ("vgg_16", "vgg16"), ("mobilenetv3_smal", "mobilenetv3_small_100"),
    ("efficientnet_b00", "efficientnet_b0"),
])
def test_unknown_name_lists_close_matches(name, close):
    with pytest.raises(ValueError, match=rf"Unknown model {name!r}\. Closest valid names: .*\b{close}\b") as err:
        build_model(name, 3)
    assert "\n" not in str(err.value)


def test_unknown_name_in_config_names_the_source():
    with pytest.raises(ValueError, match=r"--set: model='resnet_18': Unknown model 'resnet_18'.*resnet18"):
        apply_overrides(TrialConfig(), {"model": "resnet_18"}, source="--set")


def test_explicit_zoo_prefix():
    assert resolve_model("timm:resnet18") == ("timm", "resnet18")
    assert resolve_model("torchvision:resnet18") == ("torchvision", "resnet18")
    assert resolve_model("resnet18") == ("ours", "resnet18")
    with pytest.raises(ValueError, match=r"Unknown model zoo 'hub'"):
        resolve_model("hub:resnet18")
    with pytest.raises(ValueError, match=r"Unknown timm model 'alexnet'"):
        resolve_model("timm:alexnet")


def test_imagenet_for_a_timm_name_asks_timm_for_its_pretrained_weights(monkeypatch):
    import timm

    asked = {}

    def fake_create_model(**kwargs):
        asked.update(kwargs)
        return timm.models.create_model(kwargs["model_name"], num_classes=kwargs["num_classes"],
                                        in_chans=kwargs["in_chans"])

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    build_model("resnet10t", 5, in_channels=1, pretrained="imagenet")
    assert asked["pretrained"] is True and asked["in_chans"] == 1 and asked["num_classes"] == 5
    assert "pretrained_cfg_overlay" not in asked  # timm's own source: the Hugging Face hub


def test_unknown_model_in_a_space_names_file_line_and_close_names(tmp_path):
    from search.space import SpaceError, load_space

    path = tmp_path / "space.yaml"
    path.write_text("metric: {name: val_macro_f1, mode: max}\nfixed:\n  model: resnet_18\n"
                    "parameters:\n  lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    space = load_space(str(path))  # reading a space resolves no model (no torch)
    with pytest.raises(SpaceError) as err:
        space.check_models()  # the search plan runs this before Ray starts
    message = str(err.value)
    assert message.startswith(f"{path}:3: fixed.model: ") and "Unknown model 'resnet_18'" in message
    assert "resnet18" in message and "\n" not in message


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_resumes_after_an_epoch_as_the_uninterrupted_run(name):
    """fit's resume state (weights, optimizer, scheduler) rebuilds every family exactly; each
    epoch is two passes over the 24 images (epoch_images), the budget unit resume crosses."""
    from fer.data import Split
    from fer.train.fitting import Stage, fit
    from fer.train.state import FitState

    _, size = FAMILIES[name]
    cfg = TrialConfig(model=name, image_size=size, batch_size=16, epochs=2, epoch_images=48, augment="weak",
                      amp=False, warmup_epochs=0, dropout=0.1)
    x, y = _images(24, size, seed=1)
    val = Split(*_images(12, size, seed=2))
    counts = np.bincount(y, minlength=3)

    def run(resume=None):
        states = []
        fit(cfg, Stage.of(cfg, "teacher", x, y, counts), val, CLASSES, progress=False,
            resume=None if resume is None else FitState.from_dict(resume),
            report=lambda m, c, s: states.append(saved_and_loaded(s.to_dict())))
        return states

    whole = run()
    assert [s["epoch"] for s in whole] == [1, 2]
    resumed = run(resume=whole[0])
    assert [s["epoch"] for s in resumed] == [2]
    assert resumed[0]["step"] == whole[1]["step"] == 2 * 3  # 48 images a epoch in batches of 16
    for key, value in whole[1]["model"].items():
        torch.testing.assert_close(resumed[0]["model"][key], value, rtol=0, atol=0)
    assert untimed(resumed[0]["history"]) == untimed(whole[1]["history"])
