"""Model registry: the paper's CIFAR models by name, any torchvision classifier by name, and
any model of the user's own as ``"package.module:callable"``."""

import difflib
import functools
import importlib
import re
import traceback
from pathlib import Path

import torch.nn as nn

from ..errors import ConfigError
from . import mobilenetv2, resnet_cifar, vgg, wrn

CIFAR_MODELS = {**resnet_cifar.MODELS, **mobilenetv2.MODELS, **vgg.MODELS, **wrn.MODELS}


def available_models() -> list[str]:
    import torchvision.models

    return sorted(CIFAR_MODELS) + [f"tv:{n}" for n in torchvision.models.list_models(torchvision.models)]


# "package.module:callable", the callable possibly an attribute path ("module:Class.build").
_IMPORT_FORM = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def unknown_model_message(name: str) -> str | None:
    """None if ``name`` is a model graft can build, else an error message naming the closest one.

    A ``"package.module:callable"`` name is only checked for its form here (nothing is
    imported before the run starts); ``build_model`` names what fails to import or build.
    """
    if name in CIFAR_MODELS:
        return None
    if ":" in name and not name.startswith("tv:"):
        if _IMPORT_FORM.fullmatch(name):
            return None
        return f"{name!r} is not of the form 'package.module:callable' (Python names, one colon)"
    if name.startswith("tv:"):
        import torchvision.models

        if name[3:] in torchvision.models.list_models(torchvision.models):
            return None
    close = difflib.get_close_matches(name, available_models(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown model {name!r}{hint}; CIFAR models: {', '.join(sorted(CIFAR_MODELS))}; "
            "torchvision classifiers as 'tv:<name>'; your own as 'package.module:callable'")


def build_model(name: str, num_classes: int) -> nn.Module:
    """``resnet32``, ``mobilenetv2``, ... for CIFAR; ``tv:resnet18`` for a torchvision model;
    ``package.module:callable`` imported from the Python path and called with ``num_classes``."""
    problem = unknown_model_message(name)
    if problem:
        raise ConfigError(f"model: {problem}")
    if name in CIFAR_MODELS:
        return CIFAR_MODELS[name](num_classes=num_classes)
    if not name.startswith("tv:"):
        return _build_imported(name, num_classes)
    import torchvision.models

    return torchvision.models.get_model(name[3:], weights=None, num_classes=num_classes)


def _build_imported(name: str, num_classes: int) -> nn.Module:
    """Import ``package.module``, look up the callable, call it; whatever fails is named in one line."""
    module_name, _, attr = name.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything while it is imported
        raise ConfigError(f"model: cannot import module {module_name!r} ({_describe(e)})") from e
    try:
        obj = functools.reduce(getattr, attr.split("."), obj)
    except AttributeError:
        raise ConfigError(f"model: module {module_name!r} has no attribute {attr!r}") from None
    call = f"{name}(num_classes={num_classes})"
    if not callable(obj):
        raise ConfigError(f"model: {name}: a {type(obj).__name__!r} object, not a callable")
    try:
        model = obj(num_classes=num_classes)
    except Exception as e:
        raise ConfigError(f"model: {call} failed ({_describe(e)})") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: {call} returned a {type(model).__name__!r} object, not a torch.nn.Module")
    return model


def _describe(e: BaseException) -> str:
    """``TypeError: message, at file.py:12`` (the innermost frame outside importlib), one line."""
    text = str(e).strip().splitlines()
    out = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    machinery = Path(importlib.__file__).parent
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not (f.filename.startswith("<frozen") or Path(f.filename).parent == machinery)]
    if len(frames) > 1:  # the first frame is this module's own call
        out += f", at {Path(frames[-1].filename).name}:{frames[-1].lineno}"
    return out
