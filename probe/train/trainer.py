"""The trainer behind ``probe train``: recipes, device-resident data, checkpoints, resume.

A run directory holds ``run.json`` (the configuration and environment), ``history.json`` (one
record per epoch), ``checkpoints/epoch-XXXX.{safetensors,json}`` at the requested epochs and
``resume.{safetensors,json}`` (weights, momentum and position, rewritten after every epoch).
An interrupted run started again with the same configuration continues after its last finished
epoch; a finished run returns at once.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from torch import nn

from probe.data import DeviceLoader, ImageArrays, load_dataset
from probe.distributed.group import raise_if_terminated
from probe.errors import ProbeError
from probe.provenance import code_revision, command_line, library_versions
from probe.runtime import runtime_settings
from probe.train.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_extra_tensors,
    save_checkpoint,
)
from probe.train.ddp import Replicas
from probe.train.graphs import (
    check_graphable,
    graph_autocast,
    graphed_forward,
    replayed_backward,
)
from probe.train.init import prepare_init
from probe.train.recipes import Recipe, get_recipe, lr_at
from probe.train.runs import (
    TrainConfig,
    TrainResult,
    default_run_dir,
    is_history,
    planned_epochs,
    read_history,
    run_identity,
)
from probe.zoo import create, parse_name

__all__ = [
    "train",
    "evaluate",
    "calibrate_bn_",
    "parse_save_at",
    "resolve_device",
    "run_lock",
]

Callback = Callable[[str, dict], None]
_INIT_BATCHES = 50  # training batches whose statistics set identity-initialised BNs


def _resumed_history(meta: dict, path: Path, epoch: int) -> list[dict]:
    """The history up to ``epoch``: from the resume checkpoint (written with its weights), else
    from history.json (runs written before the history was kept in the checkpoint), validated."""
    history = meta.get("history")
    if history is None:
        with contextlib.suppress(ProbeError):
            history = read_history(path)
    if not (is_history(history) and len(history) >= epoch + 1):
        raise ProbeError(
            f"Cannot resume from epoch {epoch}: {path} is missing, empty or damaged and the resume "
            "checkpoint does not hold the history. Delete the run directory to train again."
        )
    return history[: epoch + 1]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ["auto", "cpu"] + (
        [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ProbeError(
            f"Invalid device {device!r}; allowed here: {', '.join(available)}."
        ) from None
    usable = {
        "cpu": True,
        "cuda": torch.cuda.is_available()
        and (dev.index is None or dev.index < torch.cuda.device_count()),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if not usable.get(dev.type, False):
        raise ProbeError(
            f"Device {device!r} is not available on this machine; allowed here: "
            f"{', '.join(available)}."
        )
    if dev.type == "cuda" and dev.index is None:
        from probe.distributed import launched

        if launched():  # each rank torchrun starts on a node has its own GPU
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def parse_save_at(spec: str, epochs: int, what: str = "--save-at") -> list[int]:
    """'0,1,5,mid,last' -> sorted epochs within [0, epochs] ('mid' = epochs // 2, at least 1;
    'all' = every epoch).

    Example:
        >>> parse_save_at("0,1,5,last", 12)
        [0, 1, 5, 12]
    """
    out = set()
    for tok in str(spec).split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok == "all":
            out.update(range(epochs + 1))
            continue
        if tok in ("last", "mid"):
            out.add(epochs if tok == "last" else max(1, epochs // 2))
            continue
        try:
            e = int(tok)
        except ValueError as exc:
            raise ProbeError(
                f"Invalid {what} entry {tok!r} in {spec!r}; use epochs like '0,1,5,mid,last' or 'all'."
            ) from exc
        if not 0 <= e <= epochs:
            raise ProbeError(
                f"{what} epoch {e} is outside 0..{epochs} (the recipe trains {epochs} epochs)."
            )
        out.add(e)
    return sorted(out)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DeviceLoader, replicas: Replicas | None = None
) -> dict[str, float]:
    """Mean cross-entropy and error of ``model`` in eval mode over ``loader``; restores the mode.
    With ``replicas`` over several ranks each rank evaluates its part and the sums are shared."""
    was_training = model.training
    model.eval()
    n = loader.num_samples
    if replicas is not None and replicas.parallel:
        loader = loader.shard(*replicas.part(n))
    loss = torch.zeros((), device=loader.device, dtype=torch.float64)
    wrong = torch.zeros((), device=loader.device, dtype=torch.int64)
    try:
        for x, y, _ in loader:
            with _autocast(loader.device):
                out = model(x)
            loss += F.cross_entropy(out.float(), y, reduction="sum").double()
            wrong += (out.argmax(1) != y).sum()
    finally:
        model.train(was_training)
    if replicas is not None:
        loss, wrong = replicas.sum(loss, wrong)
    return {"loss": loss.item() / n, "error": wrong.item() / n}


@torch.no_grad()
def calibrate_bn_(model: nn.Module, loader: DeviceLoader) -> None:
    """Set every BatchNorm's running statistics to the exact averages over ``loader`` (weights unchanged).

    At initialisation the running statistics are (0, 1), so an eval-mode pass would measure an
    un-normalised network. The epoch-0 checkpoint is therefore calibrated on the training images,
    making eval-mode measurements at initialisation use data statistics like every later checkpoint.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over batches
    model.train()
    try:
        for x, _, _ in loader:
            with _autocast(loader.device):
                model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)


def _param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    if recipe.wd_on_bn:
        return [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "weight_decay": recipe.weight_decay,
            }
        ]
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _momentum_state(opt: torch.optim.SGD, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum.{names[id(p)]}"] = buf
    return out


def _restore_momentum(
    opt: torch.optim.SGD, names: dict[int, str], extra: dict[str, torch.Tensor]
) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            key = f"momentum.{names[id(p)]}"
            if key in extra:
                opt.state[p]["momentum_buffer"] = extra[key].to(p.device, p.dtype)


def _write_json(path: Path, doc: object) -> None:
    """``doc`` as JSON with sorted keys, the order the resume checkpoint keeps the history in:
    a run resumed or run again writes the very file it wrote when trained in one go (figures of
    its curves are then reused, analyses.figure_reuse), and a file already holding it is left
    untouched."""
    text = json.dumps(doc, indent=2, sort_keys=True, default=str)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text() == text:
            return
    atomic_write_text(path, text)


def _stored_run(path: Path) -> dict:
    """The run.json a run directory holds, refused with what to do where it is damaged: it is
    what a resumed run's settings are checked against, so a run is never resumed unchecked."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        doc, why = None, f"{type(e).__name__}: {e}"
    else:
        why = f"a JSON {type(doc).__name__}, not an object"
    if not isinstance(doc, dict):
        raise ProbeError(
            f"{path} is damaged ({why}). It records the settings this run was trained with, which "
            "resuming must match. Move the run directory aside (its checkpoints still load with "
            "probe capture CHECKPOINT) or delete it, and train again."
        )
    return doc


@contextlib.contextmanager
def _claimed(run_dir: Path, replicas: Replicas, setup: Callable[[], None]):
    """Rank 0 (or the only process) creates ``run_dir``, holds its lock while the run writes
    there and runs ``setup`` under it; a failure there stops every rank."""
    with contextlib.ExitStack() as held:

        def claim() -> None:
            run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(run_lock(run_dir))
            setup()

        replicas.on_main(f"starting the run in {run_dir}", claim)
        yield


@contextlib.contextmanager
def run_lock(run_dir: Path, who: str = "training process"):
    """Hold ``run_dir``'s lock (``.lock``, via filelock) while a run writes there; a second
    ``train`` (or ``who``) into the same directory stops at once instead of interleaving its
    files."""
    lock = FileLock(run_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ProbeError(
            f"Another {who} is writing to {run_dir} (its lock file {run_dir / '.lock'} "
            "is held). Wait for it to finish, or choose another --out."
        ) from None
    try:
        yield
    finally:
        lock.release()


def train(
    cfg: TrainConfig,
    callback: Callback | None = None,
    data: ImageArrays | None = None,
    *,
    distributed: bool | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.recipe``; resume if interrupted.

    ``callback(event, info)`` receives ``"start"``, ``"step"`` (every few iterations), ``"epoch"``
    and ``"end"`` events so a caller can draw progress; the library itself never prints.

    Under an initialised process group with several ranks (torchrun; ``distributed=None``, the
    default) the run is data-parallel (:mod:`probe.train.ddp`): the recipe's batch size is the
    global batch, rank 0 writes the run directory, every rank resumes from its checkpoint. Pass
    ``distributed=False`` to train in this process alone.

    Example:
        >>> cfg = TrainConfig(model="resnet8", recipe_overrides={"epochs": 1}, out="/tmp/rp-doc")
        >>> train(cfg).final["epoch"]  # doctest: +SKIP
        1
    """
    t0 = time.perf_counter()
    callback = callback or (lambda event, info: None)
    _, depth = parse_name(cfg.model)
    recipe = get_recipe(cfg.recipe, depth=depth, **cfg.recipe_overrides)
    device = resolve_device(cfg.device)
    replicas = Replicas.join(device, distributed)
    if cfg.cuda_graph:  # before anything is written
        check_graphable(device, compiled=cfg.compile, ranks=replicas.world)
    if data is None:  # decoded once by rank 0 (a cache the other ranks then read)
        data = replicas.main_first("loading the data", lambda: load_dataset(cfg.dataset))
    data = data.subset(cfg.train_limit)
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    steps_per_epoch = -(-len(data.y_train) // recipe.batch_size)
    epochs = planned_epochs(recipe, steps_per_epoch)
    total_iters = min(epochs * steps_per_epoch, recipe.max_iters or 1 << 62)
    save_at = parse_save_at(cfg.save_at, epochs)
    torch.manual_seed(cfg.seed)
    options = {
        "num_classes": data.num_classes,
        "in_channels": data.image_shape[0],
        **cfg.model_options,
    }
    model = create(cfg.model, **options)  # validates name and options before anything is written
    init = prepare_init(cfg.init, model)  # and the init (a construct source is loaded and checked)
    eval_at = set(parse_save_at(cfg.eval_at, epochs, what="eval_at")) | set(save_at)
    replicas.check(len(data.y_train), recipe.batch_size, cfg.sync_bn)
    run_doc = {
        "config": cfg.to_dict(),
        "recipe": recipe.to_dict(),
        "dataset": {
            "name": data.name,
            "source": data.source,
            "train": int(len(data.y_train)),
            "test": int(len(data.y_test)),
        },
        "init_source": init.meta.get("sha256"),  # the constructed-from checkpoint's weights
    }
    run_doc = json.loads(json.dumps(run_doc, default=str))  # compare in the form it is stored

    def write_run_json() -> None:
        run_json = run_dir / "run.json"
        if run_json.exists():
            previous = _stored_run(run_json)
            if (
                run_identity(previous.get("config") or {}) != run_identity(run_doc["config"])
                or previous.get("recipe") != run_doc["recipe"]
                or previous.get("init_source") != run_doc["init_source"]
            ):
                raise ProbeError(
                    f"{run_dir} holds a run with a different configuration; choose another --out or "
                    "delete that directory to start over."
                )
        _write_json(
            run_json,
            {
                **run_doc,
                "versions": library_versions(),
                "revision": code_revision(),
                "command": command_line(),
                "runtime": runtime_settings(),
                "ranks": replicas.world,
            },
        )

    with _claimed(run_dir, replicas, write_run_json):  # one writer per run directory
        model = model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            # Autotuned kernels are fast but not reproducible; deterministic mode keeps them off.
            torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
        opt = torch.optim.SGD(
            _param_groups(model, recipe),
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov and recipe.momentum > 0,
        )
        names = {id(p): n for n, p in model.named_parameters()}

        history: list[dict] = []
        start_epoch, resumed_from = 0, None
        resume = run_dir / "resume.json"
        if resume.exists():
            restored, meta = load_checkpoint(resume, device=device)
            model.load_state_dict(restored.state_dict())
            _restore_momentum(opt, names, load_extra_tensors(resume, device=device))
            start_epoch = resumed_from = int(meta["epoch"])
            history = _resumed_history(meta, run_dir / "history.json", start_epoch)
            if replicas.is_main:
                _write_json(run_dir / "history.json", history)  # mends a damaged one
        checkpoints = {
            e: run_dir / "checkpoints" / f"epoch-{e:04d}.json"
            for e in save_at
            if (run_dir / "checkpoints" / f"epoch-{e:04d}.json").exists()
        }
        # Channels-last batches on every device: CPU convolutions take their faster path too
        # (a CIFAR ResNet-56 epoch ~20 % faster on 2 cores, docs/performance.md); one-channel
        # images are channels-last already (DeviceLoader), so digits runs are unchanged.
        loader_kw = dict(mean=data.mean, std=data.std, device=device, channels_last=True)
        train_loader = DeviceLoader(
            data.x_train,
            data.y_train,
            recipe.batch_size,
            shuffle=True,
            augment=data.augment,
            seed=cfg.seed,
            part=(replicas.rank, replicas.world),
            **loader_kw,
        )
        eval_train = DeviceLoader(data.x_train, data.y_train, cfg.eval_batch_size, **loader_kw)
        eval_test = DeviceLoader(data.x_test, data.y_test, cfg.eval_batch_size, **loader_kw)
        meta_base = {
            "model": model.config.to_dict(),
            "model_name": cfg.model,
            "recipe": recipe.to_dict(),
            "seed": cfg.seed,
            "dataset": run_doc["dataset"],
            "dataset_spec": cfg.dataset,
            "train_limit": cfg.train_limit,
            "init": cfg.init,
            "versions": library_versions(),
            "revision": code_revision(),
            "runtime": runtime_settings(),
        }

        def measure(record: dict) -> None:
            for split, loader in (("train", eval_train), ("test", eval_test)):
                metrics = evaluate(model, loader, replicas)
                record.update({f"{split}_{k}": v for k, v in metrics.items()})

        def checkpoint(epoch: int, record: dict) -> None:
            measure(record)
            metrics = {
                k: record[k] for k in ("train_loss", "train_error", "test_loss", "test_error")
            }
            stem = run_dir / "checkpoints" / f"epoch-{epoch:04d}"
            checkpoints[epoch] = replicas.on_main(
                f"saving the checkpoint of epoch {epoch}",
                lambda: save_checkpoint(
                    stem, model, {**meta_base, "epoch": epoch, "metrics": metrics}
                ),
            )

        def save_progress(epoch: int) -> None:
            _write_json(run_dir / "history.json", history)
            save_checkpoint(
                run_dir / "resume",
                model,
                # the history travels with the weights it belongs to (one atomically written file)
                {**meta_base, "epoch": epoch, "history": history},
                extra_tensors=_momentum_state(opt, names),
            )

        callback(
            "start",
            {
                "epochs": epochs,
                "start_epoch": start_epoch,
                "steps_per_epoch": steps_per_epoch,
                "run_dir": str(run_dir),
            },
        )
        if start_epoch == 0 and not history:
            record: dict = {"epoch": 0, "lr": 0.0}
            stats_loader = DeviceLoader(
                data.x_train,
                data.y_train,
                recipe.batch_size,
                shuffle=True,
                drop_last=len(data.y_train) >= recipe.batch_size,  # full batches: BN's statistics
                seed=cfg.seed,
                **loader_kw,
            )
            init_record = init.apply(
                model,
                lambda: [x for x, _, _ in itertools.islice(stats_loader, _INIT_BATCHES)],
                # see calibrate_bn_: eval-mode measures at init need data statistics
                lambda: calibrate_bn_(model, eval_train),
            )
            if init_record["kind"] != "he":
                record["init"] = init_record
            if 0 in save_at:
                checkpoint(0, record)
            elif 0 in eval_at:
                measure(record)
            history.append(record)
        # the training steps' module: the model itself, or its DDP replica (after the init, which
        # every rank computes alike on the whole data)
        net = replicas.wrap(model, cfg.sync_bn)
        if cfg.cuda_graph:
            step_fn, step_autocast = graphed_forward(net, device), graph_autocast
            step_backward = replayed_backward
        else:
            step_fn = torch.compile(net, mode=cfg.compile_mode) if cfg.compile else net
            step_autocast = functools.partial(_autocast, device)
            step_backward = contextlib.nullcontext
        it = start_epoch * steps_per_epoch
        for epoch in range(start_epoch + 1, epochs + 1):
            te = time.perf_counter()
            model.train()
            train_loader.set_epoch(epoch)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            wrong = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            for k, (x, y, _) in enumerate(train_loader):
                raise_if_terminated()  # a SIGTERM whose exception Python dropped
                if it >= total_iters:
                    break
                lr = lr_at(recipe, it, total_iters)
                for g in opt.param_groups:
                    g["lr"] = lr
                with step_autocast():
                    out = step_fn(x)
                    loss, summed = replicas.loss(out, y, train_loader.batch_samples(k))
                opt.zero_grad(set_to_none=True)
                with step_backward():
                    loss.backward()
                opt.step()
                loss_sum += summed
                wrong += (out.detach().argmax(1) != y).sum()
                seen += len(y)
                it += 1
                if it % 10 == 0:
                    callback(
                        "step",
                        {
                            "epoch": epoch,
                            "iter": it,
                            "loss": loss_sum.item() / seen,
                            "error": wrong.item() / seen,
                        },
                    )
            if replicas.parallel:  # the epoch's batch loss and error over every rank's part
                replicas.sync_buffers(model)
                loss_sum, wrong, n = replicas.sum(
                    loss_sum, wrong, torch.tensor(seen, device=device)
                )
                seen = int(n.item())
            if not torch.isfinite(loss_sum):
                raise ProbeError(
                    f"Training diverged at epoch {epoch} (loss is not finite); lower the lr."
                )
            record = {
                "epoch": epoch,
                "lr": lr,
                "batch_loss": loss_sum.item() / max(seen, 1),
                "batch_error": wrong.item() / max(seen, 1),
                "seconds": time.perf_counter()
                - te,  # the training steps alone (.item() synchronised)
            }
            if replicas.parallel:  # how the epoch ran: BN statistics per rank, or synchronised
                record.update(ranks=replicas.world, sync_bn=cfg.sync_bn)
            if epoch in eval_at:
                te = time.perf_counter()
                checkpoint(epoch, record) if epoch in save_at else measure(record)
                record["eval_seconds"] = time.perf_counter() - te
            history.append(record)

            replicas.on_main(f"saving epoch {epoch}", functools.partial(save_progress, epoch))
            callback("epoch", record)
        result = TrainResult(
            run_dir,
            history,
            dict(sorted(checkpoints.items())),
            time.perf_counter() - t0,
            resumed_from,
            model=model.eval(),
        )
        callback("end", {"wall_s": result.wall_s, "final": result.final})
        return result
