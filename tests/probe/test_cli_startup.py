"""The command line answers --help and argument errors, and joins shards, without loading torch
(~2 s), a capture loads no table or plotting library, and the lazily loaded top-level names of
``import probe`` are the ones its type-checking imports name."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import probe
import probe.store
import probe.zoo


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_help_and_argument_errors_do_not_load_torch(tmp_path):
    code = f"""
import sys
from click.testing import CliRunner
from probe.cli.main import cli
runner = CliRunner()
for args, code in (
    (["--help"], 0),
    (["capture", "--help"], 0),
    (["study", "--help"], 0),
    (["train", "--nope"], 2),
    (["capture", "--probe", "residual", {str(tmp_path / "missing.pt")!r}], 2),
):
    result = runner.invoke(cli, args)
    assert result.exit_code == code, (args, result.output)
print(sorted(m for m in ("torch", "numpy", "h5py") if m in sys.modules))
"""
    assert _fresh(code) == "[]"


def test_listing_and_naming_zoo_models_loads_no_torch():
    code = """
import sys
from click.testing import CliRunner
from probe.cli.main import cli
result = CliRunner().invoke(cli, ["models", "plain5*"])
assert result.exit_code == 0 and result.output.split() == ["plain56"], result.output
assert CliRunner().invoke(cli, ["models", "vgg*"]).exit_code != 0
import probe.zoo
assert probe.zoo.parse_name("preresnet110") == ("preresnet", 110)
assert probe.zoo.NetConfig(depth=20).blocks_per_stage == 3
loaded = "torch" in sys.modules
probe.zoo.create("resnet8")  # building one loads it
print(loaded, "torch" in sys.modules)
"""
    assert _fresh(code) == "False True"


def test_a_command_that_runs_models_still_sets_its_threads(tmp_path):
    out = str(tmp_path / "x.h5")
    code = f"""
from click.testing import CliRunner
from probe.cli.main import cli
args = ["--threads", "1", "capture", "--model", "nope:x", "--out", {out!r}]
result = CliRunner().invoke(cli, args)
print(result.exit_code, "using 1 CPU thread" in result.output)
"""
    exit_code, said = _fresh(code).split()
    assert exit_code == "1" and said == "True"  # the threads were set before the model failed


def test_import_probe_loads_no_torch_and_every_name_resolves():
    assert _fresh("import sys, probe; print('torch' in sys.modules)") == "False"
    for name in probe.__all__:
        assert getattr(probe, name) is not None, name
    assert set(probe.__all__) <= set(dir(probe))


def test_a_capture_loads_no_table_or_plotting_library(tmp_path):
    # pandas alone took 0.3-0.45 s of a capture's ~1.4 s cold start on the 2-core CPU (a cold
    # capture on a GPU host spent ~2 s before its first write); to_frame loads it when asked.
    # (scipy is not among them: numba, which the one-pass statistics load, imports parts of it)
    code = f"""
import sys, torch, probe
model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
batch = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
cap = probe.capture(model, batch, probes=["residual", "channel"], out={str(tmp_path / "c.h5")!r})
cap.read("stages.0.0", "f_norm")
heavy = ("pandas", "matplotlib", "seaborn", "sklearn")
print([m for m in heavy if m in sys.modules], cap.to_frame().shape[0] > 0, "pandas" in sys.modules)
"""
    assert _fresh(code) == "[] True True"


def test_inspecting_a_capture_loads_no_torch(tmp_path):
    import torch

    out = tmp_path / "c.h5"
    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    batch = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    probe.capture(model, batch, probes=["residual"], out=out).close()
    code = f"""
import sys
from click.testing import CliRunner
from probe.cli.main import cli
result = CliRunner().invoke(cli, ["inspect", "--verify", {str(out)!r}])
assert result.exit_code == 0 and "stages.0.0" in result.output, result.output
print("torch" in sys.modules)
"""
    assert _fresh(code) == "False"


@pytest.mark.parametrize(
    "package", [probe, probe.store, probe.zoo], ids=["probe", "probe.store", "probe.zoo"]
)
def test_lazy_names_match_the_type_checking_imports(package):
    tree = ast.parse(Path(package.__file__).read_text())
    checked = next(n for n in tree.body if isinstance(n, ast.If))  # if TYPE_CHECKING:
    imported = {}
    for node in checked.body:
        for alias in node.names:
            name = alias.asname or alias.name
            if node.module == package.__name__:  # from probe import testing, zoo: submodules
                imported[name] = (f"probe.{alias.name}", None)
            else:
                imported[name] = (node.module, alias.name)
    assert imported == package._HOME
    assert set(imported) == set(package.__all__)
    for name in package.__all__:
        assert getattr(package, name) is not None, name


def test_a_submodule_imported_first_does_not_hide_the_function_of_its_name():
    code = "import probe.capture, probe; print(callable(probe.capture), probe.capture.__module__)"
    assert _fresh(code) == "True probe.capture"


def test_joining_shards_loads_no_torch(tmp_path):
    import torch

    model = probe.zoo.create("resnet8", in_channels=1, width=4).eval()
    x, y = torch.randn(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)
    parts = []
    for rank, (a, b) in enumerate([(0, 3), (3, 6)]):
        parts.append(tmp_path / f"rank{rank}.h5")
        probe.capture(
            model, [(x[a:b], y[a:b])], probes=["residual"], out=parts[-1], shard=(rank, 2),
            sample_offset=a,
        ).close()  # fmt: skip
    code = f"""
import sys
from click.testing import CliRunner
from probe.cli.main import cli
result = CliRunner().invoke(cli, ["join", {str(tmp_path / "all.h5")!r}, *{list(map(str, parts))!r}])
assert result.exit_code == 0 and "joined 2 shards" in result.output, result.output
print("torch" in sys.modules)
"""
    assert _fresh(code) == "False"
