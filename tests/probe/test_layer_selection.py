"""Layer selection: globs, regular expressions and plain dotted names select the same modules a
full-name regular expression does, in forward-definition order; a name that matches nothing is an
error with a hint."""

import re

import pytest
from torch import nn

import probe
from probe.hooks.select import select_modules


def _model():
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    return nn.Sequential(inner, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))


def _by_regex(model, names):
    """The reference: every module whose dotted name fully matches an escaped name."""
    rx = [re.compile(re.escape(n)) for n in names]
    return [(n, m) for n, m in model.named_modules() if n and any(r.fullmatch(n) for r in rx)]


def test_plain_names_select_exactly_those_modules_in_model_order():
    model = _model()
    names = [n for n, _ in model.named_modules() if n]
    for name in names:
        assert select_modules(model, name) == _by_regex(model, [name])
    picked = [names[3], names[0], names[2]]  # out of order: the model's order comes back
    assert select_modules(model, picked) == _by_regex(model, picked)
    assert [n for n, _ in select_modules(model, picked)] == sorted(picked, key=names.index)


def test_plain_names_mix_with_globs_and_regular_expressions():
    model = probe.zoo.create("resnet8")
    got = [n for n, _ in select_modules(model, ["stem.bn", "stages.1.*", "re:stages\\.2\\.0"])]
    assert got == ["stem.bn", "stages.1.0", "stages.2.0"]


def test_a_plain_name_that_matches_nothing_is_an_error_with_a_hint():
    model = probe.zoo.create("resnet8")
    with pytest.raises(probe.ProbeError, match=r"No module matches 'stages\.0\.9'.*'stages\.0\.0'"):
        select_modules(model, ["stages.0.0", "stages.0.9"])
    with pytest.raises(probe.ProbeError, match="No module matches 'stages.0 '"):
        select_modules(model, "stages.0 ")  # no stripping: a name is taken as it is
    # where a CLI user, who has no list_layers to call, starts looking
    top = r"its top-level modules: stem \(Sequential\), stages \(Sequential\), head"
    with pytest.raises(probe.ProbeError, match=top):
        select_modules(model, "body.*")
