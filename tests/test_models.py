import pytest
import torch
from torchvision import models as tvm

from fer.train.models import MODELS, build_model, first_conv_name, head_name


@pytest.fixture(autouse=True)
def _small_threads():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_small_input(name, in_channels):
    model = build_model(name, num_classes=7, in_channels=in_channels, dropout=0.3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 48, 48))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    conv = model.get_submodule(first_conv_name(model))
    assert conv.in_channels == in_channels


@pytest.mark.parametrize("name", list(MODELS))
def test_dropout_before_classifier(name):
    model = build_model(name, num_classes=5, dropout=0.37)
    rates = [m.p if isinstance(m, torch.nn.Dropout) else getattr(m, "dropout", None) for m in model.modules()]
    assert 0.37 in rates
    assert model.get_submodule(head_name(model)).out_features == 5


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match=r"Unknown model 'mobilenet_v3_smal'. Closest valid names: mobilenet_v3_small"):
        build_model("mobilenet_v3_smal", num_classes=7)


def test_local_weights_with_other_class_count(tmp_path):
    # A torchvision ImageNet-shaped checkpoint (3 channels, 1000 classes), randomly initialised.
    source = tvm.mobilenet_v3_small(weights=None)
    path = tmp_path / "imagenet_like.pth"
    torch.save(source.state_dict(), path)

    model = build_model("mobilenet_v3_small", num_classes=7, in_channels=1, pretrained=str(path))
    state, ref = model.state_dict(), source.state_dict()
    conv = first_conv_name(model) + ".weight"
    torch.testing.assert_close(state[conv], ref[conv].sum(dim=1, keepdim=True))
    torch.testing.assert_close(state["features.3.block.0.0.weight"], ref["features.3.block.0.0.weight"])
    torch.testing.assert_close(state["classifier.0.weight"], ref["classifier.0.weight"])
    assert state["classifier.3.weight"].shape == (7, 1024)

    # Summed kernels answer a gray image exactly like RGB kernels answer its 3-channel copy.
    gray = torch.randn(1, 1, 48, 48)
    stem_rgb = source.features[0][0]
    stem_gray = model.features[0][0]
    torch.testing.assert_close(stem_gray(gray), stem_rgb(gray.expand(1, 3, 48, 48)), rtol=1e-4, atol=1e-5)


def test_local_weights_same_class_count_resnet(tmp_path):
    source = tvm.resnet18(weights=None, num_classes=4)
    path = tmp_path / "r18.pth"
    torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = build_model("resnet18", num_classes=4, in_channels=3, pretrained=str(path))
    torch.testing.assert_close(model.fc.weight, source.fc.weight)
    model.eval(), source.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_local_weights_wrong_architecture(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"r18.pth.*does not match this architecture"):
        build_model("mobilenet_v3_small", num_classes=7, pretrained=str(path))


def test_local_weights_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope.pth.*no such file"):
        build_model("resnet18", num_classes=7, pretrained=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("name", list(MODELS))
def test_imagenet_weights_enum_exists(name):
    # The lookup only; get_state_dict would download, which tests never do.
    weights = tvm.get_model_weights(name).DEFAULT
    assert weights.meta["num_params"] > 0


def test_imagenet_path_adapts_like_a_file(monkeypatch):
    source = tvm.mobilenet_v3_small(weights=None)
    monkeypatch.setattr("fer.train.models._imagenet_state_dict", lambda name: source.state_dict())
    model = build_model("mobilenet_v3_small", num_classes=3, in_channels=1, pretrained="imagenet")
    conv = first_conv_name(model) + ".weight"
    torch.testing.assert_close(model.state_dict()[conv], source.state_dict()[conv].sum(1, keepdim=True))
    assert model.classifier[3].out_features == 3
