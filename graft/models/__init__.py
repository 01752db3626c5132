"""Model registry: the paper's CIFAR models by name, and any torchvision classifier by name."""

import difflib

import torch.nn as nn

from . import mobilenetv2, resnet_cifar, vgg, wrn

CIFAR_MODELS = {**resnet_cifar.MODELS, **mobilenetv2.MODELS, **vgg.MODELS, **wrn.MODELS}


def available_models() -> list[str]:
    import torchvision.models

    return sorted(CIFAR_MODELS) + [f"tv:{n}" for n in torchvision.models.list_models(torchvision.models)]


def unknown_model_message(name: str) -> str | None:
    """None if ``name`` is a model graft can build, else an error message naming the closest one."""
    if name in CIFAR_MODELS:
        return None
    if name.startswith("tv:"):
        import torchvision.models

        if name[3:] in torchvision.models.list_models(torchvision.models):
            return None
    close = difflib.get_close_matches(name, available_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown model {name!r}{hint}; CIFAR models: {', '.join(sorted(CIFAR_MODELS))}; "
            "torchvision classifiers as 'tv:<name>'")


def build_model(name: str, num_classes: int) -> nn.Module:
    """``resnet32``, ``mobilenetv2``, ... for CIFAR; ``tv:resnet18`` for a torchvision model."""
    problem = unknown_model_message(name)
    if problem:
        raise ValueError(problem)
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes)
    import torchvision.models

    return torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)
