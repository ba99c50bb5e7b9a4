"""Image classifiers by name: torchvision architectures adapted to grayscale and small inputs.

Every model keeps torchvision's own module names, so a plain torchvision state dict
(`torch.save(model.state_dict())`, or the ImageNet weights enum) loads into it. Two
adaptations happen on top:

- the first convolution takes `in_channels` inputs (1 for FER); RGB ImageNet kernels are
  summed over the colour axis, which gives the same response to a gray image replicated to
  three channels (the trick timm's `adapt_input_conv` uses);
- dropout sits right before the final linear layer (MobileNetV3 and EfficientNet already
  have one there; ResNet gets a `DropoutLinear` head with the same parameter names).

All four networks end in adaptive average pooling, so 48x48 inputs work as they are
(a 2x2 map before pooling for stride-32 networks); larger `image_size` values upsample.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm


class DropoutLinear(nn.Linear):
    """A linear layer that applies dropout to its input; parameters named like nn.Linear."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.dropout(x, self.dropout, self.training))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}"


def _mobilenet_v3_small(num_classes: int, dropout: float) -> nn.Module:
    return tvm.mobilenet_v3_small(weights=None, num_classes=num_classes, dropout=dropout)


def _mobilenet_v3_large(num_classes: int, dropout: float) -> nn.Module:
    return tvm.mobilenet_v3_large(weights=None, num_classes=num_classes, dropout=dropout)


def _resnet18(num_classes: int, dropout: float) -> nn.Module:
    model = tvm.resnet18(weights=None, num_classes=num_classes)
    head = DropoutLinear(model.fc.in_features, num_classes, dropout)
    head.load_state_dict(model.fc.state_dict())  # keep torchvision's initialisation
    model.fc = head
    return model


def _efficientnet_b0(num_classes: int, dropout: float) -> nn.Module:
    return tvm.efficientnet_b0(weights=None, num_classes=num_classes, dropout=dropout)


# name -> builder(num_classes, dropout) returning a 3-channel torchvision model.
MODELS: dict[str, Callable[[int, float], nn.Module]] = {
    "mobilenet_v3_small": _mobilenet_v3_small,
    "mobilenet_v3_large": _mobilenet_v3_large,
    "resnet18": _resnet18,
    "efficientnet_b0": _efficientnet_b0,
}


def get_model_builder(name: str) -> Callable[[int, float], nn.Module]:
    """The builder registered under `name`; a miss lists the valid names."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(MODELS)}")
    return MODELS[name]


def first_conv_name(model: nn.Module) -> str:
    """Name of the stem convolution (the first Conv2d in module order)."""
    return next(name for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d))


def head_name(model: nn.Module) -> str:
    """Name of the classifier layer (the last Linear in module order)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)][-1]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapt_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Convert a conv kernel (O, C, k, k) to `in_channels` inputs.

    C -> 1 sums the kernel over its inputs (a gray image copied to C channels gives the
    same activation); otherwise the kernel is tiled and rescaled by C / in_channels so
    the expected activation stays the same (timm `adapt_input_conv`).
    """
    channels = weight.shape[1]
    if channels == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // channels)
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (channels / in_channels)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    name = first_conv_name(model)
    old: nn.Conv2d = model.get_submodule(name)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_conv_weight(old.weight, in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _set_module(model, name, new)


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    # Downloads on first use (cached by torch.hub); never called by the tests.
    weights = tvm.get_model_weights(name).DEFAULT
    return weights.get_state_dict(progress=True)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file (weights_only=True).

    Accepts a bare state dict, or a dict holding one under "model" / "state_dict" (our
    checkpoints, many training scripts); strips DDP's "module." prefix.
    """
    if not Path(path).is_file():
        raise ValueError(f"pretrained={path!r}: no such file (expected a state dict saved with torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor payloads
        raise ValueError(f"pretrained={path!r}: cannot be read as a weights-only state dict: {err}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained={path!r}: expected a dict of tensors (a model state dict)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, adapting the stem and skipping a differently sized head.

    The first conv is converted to the model's input channels; the classifier keeps its
    fresh initialisation when its shape differs (other class count). Any other missing
    or mis-shaped tensor is an error: the file belongs to another architecture.
    """
    target = model.state_dict()
    conv_key = first_conv_name(model) + ".weight"
    head_prefix = head_name(model) + "."
    missing = [
        k for k in target
        if k not in state and not k.startswith(head_prefix) and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise ValueError(
            f"pretrained={source!r}: state dict does not match this architecture; "
            f"missing {len(missing)} keys, e.g. {missing[:3]}"
        )
    merged = {}
    for key, value in target.items():
        if key not in state:
            merged[key] = value
            continue
        loaded = state[key]
        if key == conv_key and loaded.shape[1] != value.shape[1]:
            loaded = adapt_conv_weight(loaded, value.shape[1])
        if loaded.shape != value.shape:
            if key.startswith(head_prefix):
                merged[key] = value  # class count differs: new head
                continue
            raise ValueError(
                f"pretrained={source!r}: tensor {key!r} has shape {tuple(loaded.shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
        merged[key] = loaded.to(value.dtype)
    model.load_state_dict(merged)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    dropout: float = 0.2,
    pretrained: str | None = None,
) -> nn.Module:
    """A classifier for normalised (B, in_channels, H, W) float input.

    pretrained: None (random init), "imagenet" (torchvision's default weights; needs
    network access) or the path of a local state dict file.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    model = get_model_builder(name)(num_classes, dropout)
    _replace_first_conv(model, in_channels)
    if pretrained is not None:
        if pretrained == "imagenet":
            state, source = _imagenet_state_dict(name), f"imagenet ({name})"
        else:
            state, source = read_state_dict(pretrained), pretrained
        load_pretrained(model, state, source)
    return model
