import pytest

from probe.errors import ProbeError
from probe.probes.registry import PROBES, make_probe
from probe.testing import check_probe

SPECS = [
    "residual",
    "channel",
    "grad",
    "activations:dtype=bf16",
    "gradients:dtype=fp32",
    "jacobian:n_probes=4,top_k=1,iters=5,slq_steps=3",
    "shattered:n_points=16,max_lag=4,max_samples=2",
    "segments:n_probes=4,max_samples=3",
    "jacobian:n_probes=4,top_k=1,iters=5,slq_steps=3,spectrum_samples=3",
    "param_grads:max_samples=4",
]


@pytest.mark.parametrize("spec", SPECS)
def test_builtin_probes_pass_the_conformance_check(spec):
    check_probe(make_probe(spec))


def test_every_registered_probe_is_checked():
    make_probe("jacobian")  # registers the Jacobian probes
    assert {s.split(":")[0] for s in SPECS} == set(PROBES)


def test_a_broken_probe_fails_the_check():
    from dataclasses import dataclass
    from typing import ClassVar

    import probe

    @dataclass
    class Pooled(probe.Probe):
        name: ClassVar[str] = "pooled"

        def forward(self, call):  # not per sample: mixes the batch
            return {"m": call.output.mean().expand(call.batch_size).clone()}

    with pytest.raises(AssertionError, match="per sample"):
        check_probe(Pooled())


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("activation", "Did you mean 'activations'"),
        ("activations:dtyp=fp16", "Did you mean 'dtype'"),
        ("activations:dtype=fp8", "allowed: fp32, fp16, bf16"),
    ],
)
def test_bad_probe_specs_are_explained(spec, fragment):
    with pytest.raises(ProbeError, match=fragment):
        make_probe(spec)
