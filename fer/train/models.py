"""Image classifiers by name: ours, timm's 1,300+ architectures, torchvision's zoo.

`build_model(name, ...)` looks a name up in three places, in this order:

1. `MODELS`, our own adaptations of four torchvision networks (module names kept, so a
   plain torchvision state dict loads; dropout sits right before the final linear layer,
   ResNet gets a `DropoutLinear` head with nn.Linear's parameter names);
2. timm (`timm.create_model`), which also adapts the stem to `in_channels` by summing RGB
   kernels and swaps the classifier for `num_classes`;
3. torchvision's `get_model`, for the names timm lacks (alexnet, shufflenet_v2_*,
   vit_b_16, efficientnet_v2_*, ...).

`timm:NAME` and `torchvision:NAME` pick a zoo explicitly. An unknown name is one line
with the closest valid names.

Small inputs: stride-32 networks end in a 2x2 map at 48x48. `stem="small"` makes the
stem keep more resolution, as CIFAR ResNets do (He et al. 2016, section 4.2): the first
convolution gets stride 1, and a max-pool right after it is dropped. The stem's weights
keep their shapes, so pretrained files still load. Patch-embedding stems (ViT, Swin,
ConvNeXt) cannot be shrunk this way and are refused with the reason.

Pretrained weights: None (random init), "imagenet" (downloads: timm from the Hugging
Face hub, torchvision from its own URLs; never used by the tests) or a local file,
`.pth`/`.pt`/`.bin` (torch.save, read weights_only) or `.safetensors`, holding a state
dict bare or under "model"/"state_dict", in the format of the zoo the name resolves to.
RGB kernels are converted to `in_channels`; a classifier of another class count is
replaced by a fresh one.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from fer import names
from fer.names import check_registry

# What a model's stem may be (TrialConfig.stem): the architecture's own, or the small-input one.
STEMS = names.STEMS
STEM_CONVS = 3


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


# name -> builder(num_classes, dropout) returning a 3-channel torchvision model. These names
# win over timm's (resnet18, efficientnet_b0): checkpoints saved with them keep loading.
MODELS: dict[str, Callable[[int, float], nn.Module]] = {
    "mobilenet_v3_small": _mobilenet_v3_small,
    "mobilenet_v3_large": _mobilenet_v3_large,
    "resnet18": _resnet18,
    "efficientnet_b0": _efficientnet_b0,
}
check_registry(MODELS, names.MODELS, "fer.train.models.MODELS")


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    return frozenset(tvm.list_models(module=tvm))


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def resolve_model(name: str) -> tuple[str, str]:
    """(zoo, architecture) of a model name; a miss names the closest valid names."""
    zoo, sep, arch = name.partition(":")
    if sep:
        known = {"timm": _timm_names, "torchvision": _torchvision_names}
        if zoo not in known:
            raise ValueError(f"Unknown model zoo {zoo!r} in {name!r}: use timm:NAME or torchvision:NAME")
        if arch not in known[zoo]():
            close = difflib.get_close_matches(arch, known[zoo](), n=5, cutoff=0.5)
            raise ValueError(f"Unknown {zoo} model {arch!r}. Closest: {', '.join(close) or 'none'}")
        return zoo, arch
    if name in MODELS:
        return "ours", name
    if name in _timm_names():
        return "timm", name
    if name in _torchvision_names():
        return "torchvision", name
    pool = sorted(set(MODELS) | _timm_names() | _torchvision_names())
    close = difflib.get_close_matches(name, pool, n=6, cutoff=0.5)
    raise ValueError(
        f"Unknown model {name!r}. Closest valid names: {', '.join(close) or 'none'} "
        f"(built in: {', '.join(MODELS)}; any timm or torchvision name works, e.g. timm.list_models('resnet*'))"
    )


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


def shrink_stem(model: nn.Module, name: str) -> None:
    """The small-input stem: first conv at stride 1, a max-pool right after it removed.

    Only a stride-2 convolution whose kernel covers its stride (3x3, 7x7: ResNet, DenseNet,
    MobileNet, EfficientNet) is made stride 1; a patch
    embedding (kernel == stride, as in ViT, Swin, ConvNeXt) is refused: at stride 1 it
    would turn every pixel into a token.
    """
    modules = list(model.named_modules())
    convs = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv2d)]
    conv_name, conv = modules[convs[0]]
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    if stride > 1 and kernel <= stride:
        raise ValueError(
            f"stem=small: {name}'s stem is a {kernel}x{kernel} stride-{stride} patch embedding ({conv_name}); "
            "only convolutional stems can be shrunk: use stem=standard and a larger image_size"
        )
    conv.stride = (1, 1)
    # The stem's max-pool: the first one, when at most STEM_CONVS convolutions come before
    # it (one in ResNet and DenseNet, three in the deep stems of timm's ResNet-D/T variants).
    pools = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.MaxPool2d)]
    if pools and sum(i < pools[0] for i in convs) <= STEM_CONVS:
        _set_module(model, modules[pools[0]][0], nn.Identity())


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file: .safetensors, or torch.save (weights_only=True).

    Accepts a bare state dict, or a dict holding one under "model" / "state_dict" (our
    checkpoints, many training scripts); strips DDP's "module." prefix.
    """
    path = os.path.expanduser(path)  # a shipped space names ~/.cache/fer-search/weights/...
    if not Path(path).is_file():
        raise ValueError(f"pretrained={path!r}: no such file (expected a state dict: .pth, .pt or .safetensors)")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor payloads, bad headers
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"pretrained={path!r}: cannot be read as a weights-only state dict: {first}") from None
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


def _call_with_optional(fn: Callable[..., nn.Module], optional: dict[str, Any], **kwargs: Any) -> nn.Module:
    """fn(**kwargs, **optional), or fn(**kwargs) for an architecture that takes none of
    `optional` (img_size is a ViT argument, dropout not every torchvision model's)."""
    try:
        return fn(**kwargs, **optional)
    except TypeError as err:
        if not any(key in str(err) for key in optional):
            raise
        return fn(**kwargs)


def _timm_model(arch: str, num_classes: int, in_channels: int, dropout: float, image_size: int,
                pretrained: str | None) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_channels, drop_rate=dropout)
    state = None
    if pretrained is not None and pretrained != "imagenet":
        # Our reader (one-line errors, .safetensors or weights_only torch files); timm then
        # applies the architecture's own filter (e.g. ViT position-embedding resampling),
        # sums RGB stem kernels to in_channels and drops a classifier of another class count.
        state = read_state_dict(pretrained)
        kwargs["pretrained_cfg_overlay"] = dict(state_dict=state)
    try:
        model = _call_with_optional(timm.create_model, {"img_size": image_size}, model_name=arch,
                                    pretrained=pretrained is not None, **kwargs)
    except (RuntimeError, KeyError) as err:  # state dict keys or shapes of another architecture
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"pretrained={pretrained!r}: does not fit timm model {arch!r}: {first[:300]}") from None
    if state is not None:
        _check_timm_keys(model, state, arch, pretrained)
    return model


def _check_timm_keys(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """timm loads non-strictly when it replaces the classifier, so a file of another
    architecture would load nothing, silently; refuse it when body weights are missing."""
    head = model.pretrained_cfg.get("classifier") or head_name(model)
    heads = (head,) if isinstance(head, str) else tuple(head)
    missing = [k for k in model.state_dict() if k not in state and not k.endswith("num_batches_tracked")
               and not any(k.startswith(h + ".") for h in heads)]
    if missing:
        raise ValueError(f"pretrained={source!r}: does not fit timm model {arch!r}: missing {len(missing)} "
                         f"keys, e.g. {missing[:3]}")


def _torchvision_model(arch: str, num_classes: int, dropout: float) -> nn.Module:
    return _call_with_optional(tvm.get_model, {"dropout": dropout}, name=arch, weights=None,
                               num_classes=num_classes)


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    # Downloads on first use (cached by torch.hub); never called by the tests.
    return tvm.get_model_weights(arch).DEFAULT.get_state_dict(progress=True)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    dropout: float = 0.2,
    pretrained: str | None = None,
    *,
    image_size: int = 224,
    stem: str = "standard",
) -> nn.Module:
    """A classifier for normalised (B, in_channels, image_size, image_size) float input.

    pretrained: None, "imagenet" (downloads) or a local weight file (see the module
    docstring). `image_size` matters to architectures with a fixed token grid (ViT, Swin);
    `stem="small"` keeps more resolution in the stem (see `shrink_stem`).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels}")
    if stem not in STEMS:
        raise ValueError(f"Unknown stem {stem!r}. Valid stems: {', '.join(STEMS)}")
    zoo, arch = resolve_model(name)
    if zoo == "timm":
        model = _timm_model(arch, num_classes, in_channels, dropout, image_size, pretrained)
    else:
        model = MODELS[arch](num_classes, dropout) if zoo == "ours" else _torchvision_model(arch, num_classes, dropout)
        _replace_first_conv(model, in_channels)
        if pretrained is not None:
            if pretrained == "imagenet":
                state, source = _imagenet_state_dict(arch), f"imagenet ({arch})"
            else:
                state, source = read_state_dict(pretrained), pretrained
            load_pretrained(model, state, source)
    if stem == "small":
        shrink_stem(model, name)
    return model
