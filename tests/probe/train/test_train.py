import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from probe.errors import ProbeError
from probe.train import (
    TrainConfig,
    get_recipe,
    load_checkpoint,
    lr_at,
    parse_save_at,
    save_checkpoint,
    train,
)
from probe.zoo import create


def _cfg(tmp_path, name="run", **kw):
    base = dict(
        model="resnet8",
        model_options={"width": 4},
        recipe_overrides={"epochs": 3, "batch_size": 128},
        save_at="0,1,last",
        out=str(tmp_path / name),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_checkpoint_round_trip(tmp_path):
    net = create("plain14", width=4)
    js = save_checkpoint(tmp_path / "ck", net, {"model": net.config.to_dict(), "epoch": 3})
    loaded, meta = load_checkpoint(js)
    assert meta["epoch"] == 3 and loaded.config == net.config
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_config_mismatch_is_refused(tmp_path):
    net = create("resnet8", width=4)
    js = save_checkpoint(tmp_path / "ck", net, {"model": net.config.to_dict()})
    meta = json.loads(js.read_text())
    meta["model"]["width"] = 8
    js.write_text(json.dumps(meta))
    with pytest.raises(ProbeError, match="was edited"):
        load_checkpoint(js)


def test_checkpoint_with_swapped_weights_fails_hash(tmp_path):
    a, b = create("resnet8", width=4), create("resnet8", width=4)
    js = save_checkpoint(tmp_path / "a", a, {"model": a.config.to_dict()})
    save_file(
        {k: v.contiguous() for k, v in b.state_dict().items()}, str(tmp_path / "a.safetensors")
    )
    with pytest.raises(ProbeError, match="do not match the hash"):
        load_checkpoint(js)


def test_checkpoint_without_json_is_not_a_checkpoint(tmp_path):
    net = create("resnet8", width=4)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "x.safetensors")
    )
    with pytest.raises(ProbeError, match="No checkpoint config"):
        load_checkpoint(tmp_path / "x.safetensors")


def test_save_at_parsing():
    assert parse_save_at("0,1,5,last", 12) == [0, 1, 5, 12]
    with pytest.raises(ProbeError, match="outside"):
        parse_save_at("20", 12)
    with pytest.raises(ProbeError, match="Invalid --save-at"):
        parse_save_at("one", 12)


def test_he2016_schedule_and_warmup():
    r = get_recipe("he2016", depth=110)
    assert lr_at(r, 0, 64000) == 0.01 and lr_at(r, 400, 64000) == 0.1
    assert lr_at(r, 32000, 64000) == pytest.approx(0.01) and lr_at(
        r, 48000, 64000
    ) == pytest.approx(0.001)
    assert get_recipe("he2016", depth=56).warmup_iters == 0


def test_cosine_schedule_warms_up_and_decays():
    r = get_recipe("fast")
    assert lr_at(r, 0, 1000) < lr_at(r, r.warmup_iters, 1000)
    assert lr_at(r, 999, 1000) < 1e-3


def test_training_writes_checkpoints_and_history(tmp_path):
    res = train(_cfg(tmp_path))
    assert sorted(res.checkpoints) == [0, 1, 3]
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert "test_error" in hist[0] and "batch_loss" in hist[2]
    meta = json.loads(res.checkpoints[3].read_text())
    assert meta["seed"] == 0 and meta["recipe"]["name"] == "digits" and "torch" in meta["versions"]
    assert meta["metrics"]["train_error"] == res.final["train_error"]


def test_interrupted_run_resumes_and_matches_uninterrupted(tmp_path):
    ref = train(_cfg(tmp_path, "ref"))

    def interrupt(event, info):
        if event == "epoch" and info["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "cut"), callback=interrupt)
    resumed = train(_cfg(tmp_path, "cut"))
    assert resumed.resumed_from == 1
    a = load_file(str(ref.checkpoints[3].with_suffix(".safetensors")))
    b = load_file(str(resumed.checkpoints[3].with_suffix(".safetensors")))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_finished_run_is_not_retrained(tmp_path):
    train(_cfg(tmp_path))
    again = train(_cfg(tmp_path))
    assert again.resumed_from == 3 and again.wall_s < 5


def test_run_dir_with_other_config_is_refused(tmp_path):
    train(_cfg(tmp_path, recipe_overrides={"epochs": 1, "batch_size": 128}))
    with pytest.raises(ProbeError, match="different configuration"):
        train(_cfg(tmp_path, seed=3, recipe_overrides={"epochs": 1, "batch_size": 128}))


def test_unknown_recipe():
    with pytest.raises(ProbeError, match="Did you mean 'fast'"):
        get_recipe("fats")


def test_invalid_model_writes_nothing(tmp_path):
    with pytest.raises(ProbeError, match="6n"):
        train(_cfg(tmp_path, model="resnet21"))
    assert not (tmp_path / "run").exists()


def test_train_limit_trains_on_a_subset_and_captures_rebuild_it(tmp_path):
    from probe.loading import dataset_for

    res = train(_cfg(tmp_path, train_limit=200, recipe_overrides={"epochs": 1, "batch_size": 64}))
    run = json.loads((res.run_dir / "run.json").read_text())
    assert run["dataset"]["train"] == 200
    meta = json.loads(res.checkpoints[1].read_text())
    data = dataset_for(meta, None)
    assert len(data.y_train) == 200 and len(data.y_test) == 360
    assert len(dataset_for(meta, "digits").y_train) == 200  # a --data override keeps the subset
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert hist[1]["seconds"] > 0 and hist[1]["eval_seconds"] > 0


def test_train_limit_out_of_range_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(ProbeError, match="between 1 and 1437"):
        train(_cfg(tmp_path, train_limit=5000))
    assert not (tmp_path / "run").exists()


def test_a_moved_run_directory_resumes(tmp_path):
    import shutil

    from probe.train import TrainConfig, train

    first = TrainConfig(
        model="plain8", recipe_overrides={"epochs": 2, "batch_size": 512}, out=str(tmp_path / "a")
    )
    done = train(first)
    shutil.move(tmp_path / "a", tmp_path / "b")  # the run's identity is its configuration
    again = train(
        TrainConfig(
            model="plain8",
            recipe_overrides={"epochs": 2, "batch_size": 512},
            out=str(tmp_path / "b"),
        )
    )
    assert again.resumed_from == 2 and again.final["train_error"] == done.final["train_error"]


def test_a_save_killed_between_its_two_renames_is_recovered_from_the_weights(tmp_path):
    import shutil

    net = create("resnet8", width=4)
    js = save_checkpoint(tmp_path / "resume", net, {"model": net.config.to_dict(), "epoch": 1})
    old_json = js.read_text()
    with torch.no_grad():
        net.stem.conv.weight.add_(1.0)
    save_checkpoint(tmp_path / "resume", net, {"model": net.config.to_dict(), "epoch": 2})
    js.write_text(old_json)  # the kill: new weights renamed, the JSON rename never happened
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    model, meta = load_checkpoint(js)
    assert meta["epoch"] == 2 and torch.equal(model.stem.conv.weight, net.stem.conv.weight)
    assert json.loads(js.read_text())["epoch"] == 2  # the JSON was rebuilt


@pytest.mark.parametrize("field,value", [("epoch", 99), ("model.residual", False)])
def test_an_edited_checkpoint_config_is_refused(tmp_path, field, value):
    net = create("resnet8", width=4)
    js = save_checkpoint(tmp_path / "ck", net, {"model": net.config.to_dict(), "epoch": 3})
    meta = json.loads(js.read_text())
    if "." in field:
        outer, inner = field.split(".")
        meta[outer][inner] = value
    else:
        meta[field] = value
    js.write_text(json.dumps(meta))
    with pytest.raises(ProbeError, match="was edited"):
        load_checkpoint(js)


def test_training_resumes_after_a_kill_between_the_renames_of_resume(tmp_path):
    from probe.train import TrainConfig, train

    cfg = TrainConfig(
        model="plain8", recipe_overrides={"epochs": 2, "batch_size": 512}, out=str(tmp_path / "r")
    )
    resume = tmp_path / "r" / "resume.json"
    kept = {}

    def keep_epoch_1(event, info):
        if event == "epoch" and info["epoch"] == 1:
            kept["json"] = resume.read_text()

    done = train(cfg, callback=keep_epoch_1)
    resume.write_text(kept["json"])  # the kill: epoch-2 weights renamed, epoch-1 JSON left
    again = train(cfg)
    assert again.resumed_from == 2 and again.final["train_error"] == done.final["train_error"]


@pytest.mark.parametrize("damage", ["", "[]", "{"])
def test_a_damaged_history_json_does_not_lose_the_history(tmp_path, damage):
    from probe.train import TrainConfig, train

    cfg = TrainConfig(
        model="plain8", recipe_overrides={"epochs": 2, "batch_size": 512}, out=str(tmp_path / "r")
    )
    done = train(cfg)
    (tmp_path / "r" / "history.json").write_text(damage)
    again = train(cfg)
    assert [r["epoch"] for r in again.history] == [r["epoch"] for r in done.history] == [0, 1, 2]
    assert json.loads((tmp_path / "r" / "history.json").read_text()) == again.history


@pytest.mark.parametrize("damage", [b"", b"[]", b"{", b"\xff\xfe"])
def test_a_damaged_run_json_is_refused_with_what_to_do_and_nothing_is_touched(tmp_path, damage):
    from click.testing import CliRunner

    from probe.cli.main import cli
    from probe.train import TrainConfig, train

    cfg = TrainConfig(
        model="plain8", recipe_overrides={"epochs": 1, "batch_size": 512}, out=str(tmp_path / "r")
    )
    train(cfg)
    (tmp_path / "r" / "run.json").write_bytes(damage)
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.raises(ProbeError, match=r"run.json is damaged .* Move the run directory aside"):
        train(cfg)
    args = ["train", "--model", "plain8", "--epochs", "1", "--set", "batch_size=512"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "run.json is damaged" in res.output, res.output
    assert "unexpected" not in res.output
    after = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    assert after == before


def test_eval_at_all_records_eval_metrics_every_epoch_without_checkpoints(tmp_path):
    res = train(_cfg(tmp_path, save_at="last", eval_at="all"))
    assert all("train_error" in r and "test_error" in r for r in res.history)
    assert sorted(res.checkpoints) == [3]


def test_a_constructed_run_starts_at_the_shallow_nets_training_error(tmp_path):
    """He et al.'s constructed solution, run literally: step 0 of the deeper plain net has exactly
    the shallow net's eval-mode training error and loss."""
    shallow = train(_cfg(tmp_path, "shallow", model="plain8", save_at="last"))
    ck = shallow.checkpoints[3]
    deep = train(_cfg(tmp_path, "deep", model="plain20", save_at="0,last", init=f"construct:{ck}"))
    start, source = deep.history[0], shallow.final
    assert start["init"]["kind"] == "construct" and start["init"]["eval_max_abs_diff"] < 1e-4
    assert start["train_error"] == source["train_error"]
    assert start["train_loss"] == pytest.approx(source["train_loss"], rel=1e-4, abs=1e-6)
    assert start["train_loss"] < 2.0  # a trained start, not chance (ln 10 = 2.30)


def test_a_constructed_run_is_identified_by_its_source_weights_not_their_path(tmp_path):
    import shutil

    shallow = train(_cfg(tmp_path, "shallow", model="plain8", save_at="last"))
    ck = shallow.checkpoints[3]
    train(_cfg(tmp_path, "deep", model="plain20", init=f"construct:{ck}"))
    shutil.copytree(tmp_path / "shallow", tmp_path / "moved")
    moved = tmp_path / "moved" / "checkpoints" / ck.name
    again = train(_cfg(tmp_path, "deep", model="plain20", init=f"construct:{moved}"))
    assert again.resumed_from == 3  # the finished run is reused
    other = train(_cfg(tmp_path, "other", model="plain8", save_at="last", seed=5))
    with pytest.raises(ProbeError, match="different configuration"):
        train(_cfg(tmp_path, "deep", model="plain20", init=f"construct:{other.checkpoints[3]}"))


@pytest.mark.parametrize(
    "init,match",
    [
        ("zero", "Invalid init"),
        ("construct:", "Invalid init"),
        ("construct:/nonexistent/epoch-0001.json", "nonexistent"),
    ],
)
def test_a_bad_init_is_a_clear_error_and_writes_nothing(tmp_path, init, match):
    with pytest.raises(ProbeError, match=match):
        train(_cfg(tmp_path, "bad", model="plain20", init=init))
    assert not (tmp_path / "bad").exists()


def test_identity_init_of_a_plain_net_computes_the_stem_and_classifier_alone(tmp_path):
    res = train(_cfg(tmp_path, model="plain20", init="identity", save_at="0"))
    model, _ = load_checkpoint(res.checkpoints[0])
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    stem = model.stem(x)
    torch.testing.assert_close(model.stages[0](stem), stem, rtol=1e-5, atol=1e-5)
