"""Models from anywhere: ``--model`` specs for torchvision, timm, the zoo, a file or a package.

Specs (``probe capture --model SPEC``):

- ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME)`` (random weights; ``--weights``)
- ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False)``
- ``zoo:NAME`` -- the project's He et al. CIFAR nets (``zoo:resnet20``)
- ``path/to/file.py:FN`` -- ``FN()`` from a Python file
- ``package.module:FN`` -- ``FN()`` from an importable module

Keyword arguments for the factory come as ``key=value`` pairs (values parsed as JSON when they
parse, e.g. ``num_classes=10``). Weights are a ``.safetensors`` file or a ``torch.save``'d state
dict, read with ``weights_only=True`` (no code in the file runs); a dict holding the state dict
under ``state_dict`` or ``model`` is unwrapped, and so are keys saved from a wrapper
(``module.`` of DataParallel/DDP, ``_orig_mod.`` of torch.compile) when every key carries it.
Loading is strict: missing or unexpected keys and tensors of another shape are an error that
lists them, and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch import nn

from probe.errors import ProbeError, did_you_mean

__all__ = ["load_model", "load_weights", "model_label", "parse_kwargs", "SOURCES"]

SOURCES = ("torchvision", "timm", "zoo")


def parse_kwargs(pairs: list[str] | tuple[str, ...]) -> dict:
    """``["num_classes=10", "name=x"]`` -> ``{"num_classes": 10, "name": "x"}``.

    Example:
        >>> parse_kwargs(["num_classes=10", "drop_rate=0.1", "act=relu"])
        {'num_classes': 10, 'drop_rate': 0.1, 'act': 'relu'}
    """
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ProbeError(
                f"Model argument {pair!r} is not key=value; e.g. --model-arg num_classes=10."
            )
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _need(package: str, spec: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ProbeError(
            f"--model {spec!r} needs the {package} package, which is not installed here ({e}). "
            f"Install it (pip install {package}) next to a matching torch."
        ) from e


def _factory_from_file(path: Path, fn: str, spec: str):
    if not path.is_file():
        raise ProbeError(f"--model {spec!r}: no Python file at {path}.")
    name = f"_probe_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ProbeError(
            f"--model {spec!r}: importing {path} failed: {type(e).__name__}: {e}"
        ) from e
    return _attr(module, fn, spec, str(path))


def _attr(module, fn: str, spec: str, where: str | None = None):
    """``module``'s callable ``fn``; a clear error naming ``where`` it was looked for (the
    file, else the module's name: a file's module has an internal name) where there is none."""
    factory = getattr(module, fn, None)
    if not callable(factory):
        names = sorted(
            n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
        )
        hint = did_you_mean(fn, names) or (
            f" Its callables: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}."
            if names
            else " It defines no public callable."
        )
        raise ProbeError(
            f"--model {spec!r}: {where or module.__name__} has no callable {fn!r}.{hint}"
        )
    return factory


def _meant(spec: str) -> str:
    """A hint for a --model given without its source: the zoo or torchvision name it reads as,
    or the function a .py file needs; else nothing."""
    from probe.zoo.registry import IMAGENET_NAMES, parse_name

    bare = spec.rstrip(":")
    if bare.endswith(".py"):
        return f" Name the function of {bare} that builds the model: {bare}:FUNCTION."
    if bare in IMAGENET_NAMES:  # what most readers mean by resnet50 (create() says the same)
        return f" Did you mean 'torchvision:{bare}'?"
    try:
        parse_name(bare)
    except ProbeError:
        return ""
    return f" Did you mean 'zoo:{bare}'?"


def _build(spec: str, kwargs: dict) -> nn.Module:
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise ProbeError(
            f"Invalid --model {spec!r}; give torchvision:NAME, timm:NAME, zoo:NAME, "
            f"path/to/file.py:FUNCTION or package.module:FUNCTION.{_meant(spec)}"
        )
    if source == "torchvision":
        tv = _need("torchvision", spec)
        names = tv.models.list_models()
        if name not in names:
            raise ProbeError(
                f"torchvision has no model {name!r}.{did_you_mean(name, names)} "
                "See torchvision.models.list_models()."
            )
        return tv.models.get_model(name, weights=None, **kwargs)
    if source == "timm":
        timm = _need("timm", spec)
        if not timm.is_model(name):
            raise ProbeError(
                f"timm has no model {name!r}.{did_you_mean(name, timm.list_models())} "
                "See timm.list_models('pattern*')."
            )
        return timm.create_model(name, pretrained=False, **kwargs)
    if source == "zoo":
        from probe.zoo import create

        return create(name, **kwargs)
    if source.endswith(".py"):
        factory = _factory_from_file(Path(source), name, spec)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise ProbeError(
                f"--model {spec!r}: cannot import {source!r} ({e}). Known sources: "
                f"{', '.join(SOURCES)}; a .py file; or an importable module."
            ) from e
        factory = _attr(module, name, spec)
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise ProbeError(f"--model {spec!r}: calling {name}({kwargs or ''}) failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise ProbeError(
            f"--model {spec!r}: {name}() returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load a state dict into ``model`` strictly; returns the file's sha256.

    Example:
        >>> import tempfile, os
        >>> m = nn.Linear(2, 2); f = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(m.state_dict(), f)
        >>> len(load_weights(nn.Linear(2, 2), f))
        64
    """
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"No weights file at {path}.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except SafetensorError as e:
            raise ProbeError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ProbeError(
                f"{path} is not a state dict torch can load with weights_only=True ({e}). Save "
                "weights with torch.save(model.state_dict(), path) or as .safetensors."
            ) from e
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ProbeError(f"{path} does not hold a state dict (name -> tensor).")
    expected = model.state_dict()
    state = _unprefixed(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    # Checked before loading: load_state_dict copies the tensors that fit before it raises on
    # the others, and its message lists every mismatch in one paragraph.
    resized = [
        f"{k} {list(state[k].shape)} in the file, {list(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or resized:
        problems = [
            *([f"missing {_show(missing)}"] if missing else []),
            *([f"unexpected {_show(unexpected)}"] if unexpected else []),
            *([f"other shapes: {_show(resized)}"] if resized else []),
        ]
        raise ProbeError(
            f"Weights {path} do not fit {type(model).__name__}: {'; '.join(problems)}. Check "
            "the model spec and its arguments (e.g. num_classes)."
        )
    model.load_state_dict(state)
    return digest


# Prefixes that wrappers put before every key: DataParallel / DistributedDataParallel
# ("module.") and torch.compile's OptimizedModule ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unprefixed(state: dict, expected: dict) -> dict:
    """``state`` without a wrapper's prefix where every key carries it and the model's keys do
    not (a state dict saved from the wrapper rather than the model inside it)."""
    for prefix in _WRAPPER_PREFIXES:
        wrapped = state and all(k.startswith(prefix) for k in state)
        if wrapped and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _show(items: list[str]) -> str:
    return ", ".join(items[:4]) + (f" ... ({len(items)} in all)" if len(items) > 4 else "")


def model_label(spec: str, kwargs: dict | None = None, weights: str | Path | None = None) -> str:
    """A --model run's label: the spec, its factory arguments (sorted, JSON values) and the
    weights file's name.

    Example:
        >>> model_label("net.py:make", {"residual": False, "width": 8}, "runs/a/w.pt")
        'net.py:make(residual=false, width=8)@w.pt'
    """
    label = spec
    if kwargs:
        args = ", ".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(kwargs.items()))
        label += f"({args})"
    if weights is not None:
        label += f"@{Path(weights).name}"
    return label


def load_model(
    spec: str, weights: str | Path | None = None, kwargs: dict | None = None, seed: int = 0
) -> tuple[nn.Module, dict]:
    """(model in eval mode, provenance) for a ``--model`` spec.

    The factory runs with torch's random state seeded by ``seed`` (and restored afterwards), so
    random weights -- a model captured without ``weights`` -- are the same in every run.

    ``model_name`` in the provenance, the run's label in tables and figures, is the spec with
    its arguments and weights file (:func:`model_label`), so that the variants of one factory
    (``residual=false`` and ``true``) are different runs to the analyses.

    Example:
        >>> model, prov = load_model("zoo:resnet8", kwargs={"in_channels": 1})
        >>> prov["model_name"], model.training
        ('zoo:resnet8(in_channels=1)', False)
    """
    kwargs = dict(kwargs or {})
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(spec, kwargs)
    except ProbeError:
        raise
    except Exception as e:  # a factory's own error: say which spec and arguments failed
        raise ProbeError(
            f"--model {spec!r} with arguments {kwargs or '{}'} failed: {type(e).__name__}: {e}"
        ) from e
    prov: dict = {
        "model_name": model_label(spec, kwargs, weights),
        "model_spec": spec,
        "model_source": spec.partition(":")[0],
        "model_kwargs": kwargs,
        "model_seed": seed,
    }
    if weights is not None:
        prov["weights"] = str(weights)
        prov["weights_sha256"] = load_weights(model, weights)
    return model.eval(), prov
