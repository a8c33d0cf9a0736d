"""Train SAEs on a cached activation stream, or on the fly from the model: sweeps, exact
resume, torchrun data parallelism.

Every SAE of a sweep sees the same batches from one read of the cache; with several
hooks each batch holds the same tokens at every hook, and each hook's sweep trains on its
columns (one run gives what one run per hook gives, in one pass). Each step a
rank takes its slice of the global batch; batch-level sums inside the losses and the
gradients are summed over ranks, so N processes compute what one process computes
on the whole batch. Checkpoints (weights, Adam state, dead-latent counters, RNG,
step = data position) are written atomically every ``checkpoint_every`` steps; the
same command resumes from the last one and ends with the same weights.

Without ``activations`` the model reads the corpus as training goes
(``saekit.model_stream``): the same batches a cache of those rows would give, memory flat in
the token count, and the step alone locates the data on resume.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saekit.cache import ActivationCache, ActivationStream
from saekit.capture import ModelReading
from saekit.config import DEVICE_HELP, check_fields, flag_name, setting
from saekit.errors import ConfigError, SAEConfigError, TrainingError
from saekit.evaluate import reconstruction_metrics
from saekit.files import FolderInUseError, output_lock, save_torch, write_json
from saekit.model import default_device
from saekit.model_stream import ModelActivations
from saekit.train_data import next_batch, open_stream, replay_then
from saekit.train_log import MetricsWriter, logged_at, truncate_metrics
from saekit.train_runs import (Distributed, Run, check_finite_losses, check_finite_parameters,
                               learning_rate, make_runs, train_step)
from saekit.sae import ARCHITECTURES, SAEConfig, SAEMetadata, architecture_settings, settings_of
from saekit.sae.kernels import reused_buffers

CHECKPOINT = "checkpoint.pt"
__all__ = ["TrainConfig", "train", "train_config", "sweep_configs", "open_stream", "CHECKPOINT",
           "Distributed", "truncate_metrics"]


@dataclass
class TrainConfig(ModelReading):
    """One training run (possibly a sweep). The CLI's ``saekit train`` flags are these fields
    and, for ``options``, one flag per architecture setting (``--k``, ``--l1-coefficient``, ...).

    With ``activations`` it trains on that cache; without, on the fly: ``model`` reads
    ``dataset`` (the ``ModelReading`` fields, as for ``saekit cache``) at ``hook``.

    Every combination of ``arch``, ``latents`` and the ``options`` values an architecture has
    is trained: ``options={"k": [16, 32], "aux_k": [256]}`` sweeps k for topk and batchtopk;
    settings not given keep the architecture's default (see ``saekit.sae``'s config classes).
    """

    activations: str = setting("", "activation cache to train on (from `saekit cache`); "
                               "without it the model reads the corpus on the fly (--model, "
                               "--dataset, --hook)")
    out: str = setting("", "folder for the SAEs, their metrics.jsonl and the checkpoint")
    arch: list[str] = setting(["topk"], "architecture(s) to train (swept)")
    latents: list[int] = setting([4096], "number of latents, d_sae (swept)", ge=1)
    # architecture setting -> values swept (a single value is a one-item sweep)
    options: dict[str, list] = field(default_factory=dict, metadata={
        "cli": False, "architecture_settings": True})  # CLI: one flag per setting
    tokens: int = setting(500_000, "training tokens (steps = tokens // batch size)", ge=1)
    batch_size: int = setting(1024, "tokens per optimiser step", ge=1)
    lr: float = setting(1e-3, "Adam learning rate", gt=0)
    lr_warmup_fraction: float = setting(0.05, "fraction of steps warming the lr up from 0",
                                        ge=0, le=1)
    lr_decay_fraction: float = setting(0.2, "fraction of steps, at the end, decaying the lr "
                                       "linearly to 0", ge=0, le=1)
    hook: list[str] = setting([], "hook(s) to read (from the cache: needed when it holds "
                              "several; on the fly: always); several: one SAE or sweep per "
                              "hook, from the same batches, each in OUT/<hook>/")
    hook_out: str | None = setting(None, "train transcoders: reconstruct this hook "
                                   "from --hook's activations (e.g. blocks.6.hook_mlp_out)")
    skip_connection: bool = setting(False, "skip transcoders: also learn a linear map from "
                                    "--hook to --hook-out (needs --hook-out)")
    normalize: bool = setting(True, "scale inputs so E||x||^2 = d_in (folded into the weights "
                              "at save)")
    dead_tokens: int = setting(50_000, "a latent idle this many tokens counts as dead (AuxK, "
                               "reports)", ge=1)
    holdout_tokens: int = setting(65_536, "tokens of the cache's last shards (on the fly: "
                                  "rows read after the training rows) kept for the held-out "
                                  "evaluation (0: none)", ge=0)
    buffer_tokens: int = setting(1 << 18, "shuffle buffer, in tokens", ge=1)
    shard_rows: int = setting(64, "on the fly: rows the model reads at a time, the unit the "
                              "buffer shuffles (a cache's shard)", ge=1)
    seed: int = setting(0, "seed of initialisation and shuffling (on the fly: also of the "
                        "default corpus's order, as saekit cache --seed)")
    checkpoint_every: int = setting(100, "steps between checkpoints (resume after a kill)", ge=1)
    log_every: int = setting(10, "steps between metrics.jsonl lines", ge=1)
    device: str | None = setting(None, DEVICE_HELP)
    wandb: bool = setting(False, "also log to Weights & Biases (needs wandb installed)")

    def __post_init__(self) -> None:
        if self.hook is None or isinstance(self.hook, str):  # one hook, as before it was a list
            self.hook = [self.hook] if self.hook else []
        check_fields(self)
        self.check_reading()
        on_the_fly_only = [flag_name(f) for f in fields(self)
                           if (f.name in READING_FIELDS and getattr(self, f.name) != f.default)]
        if self.activations and on_the_fly_only:
            raise ConfigError(f"{', '.join(on_the_fly_only)}: how the model reads the corpus "
                              "when training on the fly; with --activations the cache's "
                              "activations are read instead. Drop them, or drop --activations "
                              "to train on the fly.")
        self.hook = list(dict.fromkeys(self.hook))  # a hook named twice is trained once
        unknown = sorted(set(self.arch) - set(ARCHITECTURES))
        if unknown:
            raise SAEConfigError(f"--arch: unknown architecture(s) {unknown}; choose from "
                                 f"{sorted(ARCHITECTURES)}.")
        if self.tokens < self.batch_size:
            raise TrainingError(f"--tokens must be >= --batch-size; got --tokens {self.tokens}, "
                                f"--batch-size {self.batch_size}.")
        if self.skip_connection and not self.hook_out:
            raise ConfigError("--skip-connection is for transcoders: give --hook-out too.")
        if self.hook_out and len(self.hook) > 1:
            raise ConfigError(f"--hook-out trains transcoders from one --hook; got "
                              f"{len(self.hook)} (--hook {', --hook '.join(self.hook)}): train "
                              "each transcoder in a run of its own.")
        if self.hook_out and self.hook_out in self.hook:
            raise ConfigError(f"--hook-out {self.hook_out} is --hook itself: leave it out to "
                              "train an SAE.")
        self.options = _sweep_lists(self.options, self.arch)
        for arch in self.arch:
            list(self.architecture_sweep(arch))  # each combination's settings are checked

    def architecture_sweep(self, arch: str) -> Iterator[Any]:
        """``arch``'s config dataclass for every combination of the swept values it takes."""
        config_class = ARCHITECTURES[arch].config_class
        names = [f.name for f in fields(config_class) if f.name in self.options]
        for values in itertools.product(*(self.options[name] for name in names)):
            yield config_class(**dict(zip(names, values)))

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def resume_key(self) -> dict:
        """Settings that must match to resume a run (what you may change: device, logging,
        and how the paths are spelled: the cache is compared by its resolved path, and the
        checkpoint is in ``out`` itself)."""
        skip = {"device", "wandb", "log_every", "checkpoint_every", "out", "options"}
        if self.activations:  # the model-reading settings are the cache's, not the run's
            skip |= READING_FIELDS
        if not self.hook_out:  # as checkpoints from before transcoders have it
            skip |= {"hook_out", "skip_connection"}
        key = {k: v for k, v in asdict(self).items() if k not in skip}
        # one hook (or none) keyed as before hooks were a list, so older checkpoints resume
        key["hook"] = self.hook[0] if len(self.hook) == 1 else (list(self.hook) or None)
        key["activations"] = str(Path(self.activations).resolve()) if self.activations else ""
        key["sweep"] = {arch: {f.name: self.options.get(f.name, [getattr(defaults, f.name)])
                               for f in fields(defaults)}
                        for arch in self.arch
                        for defaults in [ARCHITECTURES[arch].config_class()]}
        return key


# TrainConfig fields that only training on the fly reads
READING_FIELDS = frozenset({f.name for f in fields(ModelReading)} | {"shard_rows"})


def train_config(**settings: Any) -> TrainConfig:
    """A TrainConfig with the run's fields and architecture settings given alike by name:
    ``train_config(activations="cache", out="saes", arch=["topk"], k=[16, 32], aux_k=[256])``."""
    own = {f.name for f in fields(TrainConfig)} - {"options"}
    options = {k: v for k, v in settings.items() if k not in own and k != "options"}
    return TrainConfig(**{k: v for k, v in settings.items() if k in own},
                       options={**settings.get("options", {}), **options})


def _sweep_lists(options: Any, archs: list[str]) -> dict[str, list]:
    """``options`` with every value a list, after checking each names a setting of one of
    ``archs``."""
    if not isinstance(options, dict):
        raise ConfigError(f"TrainConfig.options maps architecture settings to the values to "
                          f"sweep, e.g. {{'k': [16, 32]}}; got {options!r}.")
    settings, taken = architecture_settings(), settings_of(archs)
    for name in options:
        owners = [arch for arch, _ in settings.get(name, [])]
        if name not in taken:
            where = f"a setting of {', '.join(owners)}" if owners else "no architecture's setting"
            raise ConfigError(f"--{name.replace('_', '-')} is {where}, and this run trains "
                              f"{', '.join(archs)}; add the architecture with --arch or drop "
                              f"the flag.")
    return {name: [_plain(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
            for name, v in options.items()}


def _plain(value: Any) -> Any:
    """numpy numbers as Python ones (checkpoints load only plain types)."""
    return value.item() if hasattr(value, "item") and hasattr(value, "dtype") else value


def sweep_configs(config: TrainConfig, d_in: int, metadata: SAEMetadata) -> dict[str, SAEConfig]:
    """Name → SAEConfig for every SAE of the sweep. A name shows the architecture, the width,
    its ``sweep_field`` and every other setting swept over more than one value:
    ``topk_w4096_k32``, ``topk_w4096_k32_aux_k256``."""
    configs = {}
    for arch, width in itertools.product(config.arch, config.latents):
        sae_class = ARCHITECTURES[arch]
        varied = [name for name in (f.name for f in fields(sae_class.config_class))
                  if name != sae_class.sweep_field and len(config.options.get(name, [])) > 1]
        for options in config.architecture_sweep(arch):
            primary = sae_class.sweep_field
            label = (f"{arch}_w{width}_{primary.split('_')[0]}"
                     f"{_label_value(getattr(options, primary))}"
                     + "".join(f"_{name}{_label_value(getattr(options, name))}"
                               for name in varied))
            configs[label] = SAEConfig(
                architecture=arch, d_in=d_in, d_sae=width, options=options,
                normalize_activations="expected_average_only_in" if config.normalize else "none",
                seed=config.seed, metadata=metadata, d_out=d_in if config.hook_out else None,
                skip_connection=config.skip_connection)
    return configs


def _label_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else str(value).lower()


def load_checkpoint(out: Path, config: TrainConfig) -> dict | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved_config = checkpoint["config"]
    except Exception as err:  # noqa: BLE001 - torch reports a damaged file in several ways
        # only a resume point (written atomically, so damaged from outside): set it aside and
        # train from the start, which ends where the interrupted run would have
        aside = path.with_name(CHECKPOINT + ".damaged")
        path.replace(aside)
        tqdm.write(f"saekit: {path} is damaged ({type(err).__name__}); moved to {aside.name}, "
                   "training from the start.")
        return None
    saved = dict(saved_config)
    saved.pop("out", None)  # checkpoints before the key compared resolved paths
    _upgrade_legacy_sweep(saved)
    if saved.get("activations"):
        saved["activations"] = str(Path(saved["activations"]).resolve())
    if saved != config.resume_key():
        differ = _differences(saved, config.resume_key())
        raise TrainingError(
            f"{path} was written by a run with other hyper-parameters ({'; '.join(differ)}). "
            "Run with the same settings to resume it, or pass another --out."
        )
    return checkpoint


def _differences(saved: dict, asked: dict, prefix: str = "") -> list[str]:
    """``"name: checkpoint has X, asked Y"`` for each differing entry (nested: ``topk.k``)."""
    out = []
    for name in dict.fromkeys([*asked, *saved]):
        old, new = saved.get(name), asked.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{prefix}{name}.")
        elif old != new:
            out.append(f"{prefix}{name}: checkpoint has {old!r}, asked {new!r}")
    return out


def _upgrade_legacy_sweep(saved: dict) -> None:
    """Checkpoints from before architecture settings moved into ``options`` kept k, the L1/L0
    coefficients and the aux coefficient as fields: compare their sweep in today's form."""
    legacy = {name: saved.pop(name) for name in ("k", "l1_coefficient", "l0_coefficient",
                                                  "aux_coefficient") if name in saved}
    if "sweep" in saved or not legacy:
        return
    archs = saved.get("arch", [])
    taken = settings_of(archs)
    options = {name: value for name, value in legacy.items() if name in taken}
    saved["sweep"] = TrainConfig(arch=archs, options=options).resume_key()["sweep"]


def save_checkpoint(out: Path, config: TrainConfig, step: int, runs: list[Run]) -> None:
    save_torch(out / CHECKPOINT, {"config": config.resume_key(), "step": step,
                                  "rng": torch.get_rng_state(),
                                  "runs": {r.name: r.state() for r in runs}})


def train(config: TrainConfig, model=None) -> dict[str, Path]:
    """Train every SAE of ``config``; returns name → saved SAE folder (under ``config.out``;
    with several hooks the names, and folders, are ``<hook>/<sweep name>``).
    ``FolderInUseError`` while another run trains into ``config.out``. ``model``: a loaded
    model to train on the fly with (else ``config.model`` is loaded when needed)."""
    device = rank_device(default_device(config.device))
    ranks = Distributed.from_environment(device)
    if not config.out:
        raise TrainingError("Give an output folder: --out DIR (TrainConfig.out).")
    with contextlib.ExitStack() as stack:
        refused = None
        if ranks.rank == 0:  # only rank 0 writes, and holds the folder's lock
            try:
                stack.enter_context(output_lock(config.out, "train"))
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks learn
                refused = err
        # every rank learns whether rank 0 got the lock, so none waits in a collective for it
        if not ranks.all_true(refused is None, device):
            raise refused or FolderInUseError(f"{config.out} is in use by another saekit "
                                              "train: rank 0 could not lock it.")
        stack.enter_context(reused_buffers())  # the steps' large temporaries, kept
        return _train(config, device, ranks, model)


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device without an index is this process's GPU (LOCAL_RANK)."""
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda"
            and device.index is None):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def _train(config: TrainConfig, device: torch.device, ranks: Distributed, model
           ) -> dict[str, Path]:
    if config.batch_size % ranks.world:
        raise TrainingError(f"batch_size {config.batch_size} must divide evenly over "
                            f"{ranks.world} processes.")
    cache, stream, holdout = open_stream(config, device, ranks, model)
    out = Path(config.out)
    runs = hook_runs(config, cache, stream, device)
    checkpoint = load_checkpoint(out, config)
    start = checkpoint["step"] if checkpoint else 0
    batches = stream.batches(start_batch=start)
    if checkpoint:
        torch.set_rng_state(checkpoint["rng"])
        for run in runs:
            run.restore(checkpoint["runs"][run.name])
    else:
        torch.manual_seed(config.seed)
        # initialise from the first batches, then train on them too (read once)
        first = [next_batch(batches, 0) for _ in range(max(1, 16384 // config.batch_size))]
        parts = stream.per_hook(torch.cat(first).to(device))
        for run in runs:
            run.sae.init_from_data(*run.sae.split_pair(parts[run.part]))
        batches = replay_then(first, batches)
        del first, parts
    writer = MetricsWriter(out, runs, start, config, learning_rate) if ranks.rank == 0 else None
    local = slice(ranks.rank * config.batch_size // ranks.world,
                  (ranks.rank + 1) * config.batch_size // ranks.world)
    progress = tqdm(total=config.steps * config.batch_size, initial=start * config.batch_size,
                    unit="tok", unit_scale=True, desc=f"train {len(runs)} SAE(s)",
                    disable=ranks.rank != 0)
    for step in range(start, config.steps):
        parts = stream.per_hook(next_batch(batches, step)[local].to(device))
        logs = {run.name: train_step(run, parts[run.part], config, step, ranks) for run in runs}
        progress.update(config.batch_size)
        if logged_at(config, step + 1) or (step + 1) % config.checkpoint_every == 0:
            check_finite_losses(runs, config)  # on every rank: they hold the same losses
        if writer:
            writer.log(step + 1, logs)
        if (step + 1) % config.checkpoint_every == 0:
            # on every rank (they hold the same parameters), so none waits for a stopped one
            check_finite_parameters(runs, step + 1)
            if ranks.rank == 0:
                save_checkpoint(out, config, step + 1, runs)
    progress.close()
    batches.close()  # nor is its shuffle group, nor the last batch, for the evaluation
    parts = None
    saved = {}
    check_finite_parameters(runs, config.steps)
    if ranks.rank == 0:
        save_checkpoint(out, config, config.steps, runs)
        if isinstance(cache, ModelActivations) and cache.world > 1:
            cache = replace(cache, rank=0, world=1, _last=None)  # rank 0 evaluates alone
        held_out = [ActivationStream(cache, config.batch_size, hook, shards=holdout,
                                     target_hook=stream.target_hook) if holdout else None
                    for hook in stream.hooks]
        if isinstance(cache, ModelActivations) and holdout:
            held_out = held_out_in_memory(held_out, holdout)
        for run in runs:
            saved[run.name] = finish_run(run, out, held_out[run.part], config)
        writer.close()
    return saved


def hook_runs(config: TrainConfig, cache: ActivationCache | ModelActivations,
              stream: ActivationStream, device: torch.device) -> list[Run]:
    """The runs of every SAE of the sweep at each of ``stream.hooks``; with several hooks a
    run's name (and folder) is ``<hook>/<sweep name>``."""
    runs = []
    for part, hook in enumerate(stream.hooks):
        metadata = SAEMetadata(model_name=cache.model_name, hook_name=hook,
                               context_size=cache.context, dataset_path=cache.source,
                               hook_name_out=stream.target_hook)
        prefix = f"{hook}/" if len(stream.hooks) > 1 else ""
        runs += make_runs(sweep_configs(config, cache.d_model, metadata), config, device,
                          part, prefix)
    return runs


def held_out_in_memory(streams: list[ActivationStream], shards: list[int]
                       ) -> list[list[torch.Tensor]]:
    """Each stream's held-out tokens, read shard by shard for every hook at once: on the fly,
    one forward over the held-out rows serves every SAE of the run."""
    kept: list[list[torch.Tensor]] = [[] for _ in streams]
    for index in shards:
        for part, stream in enumerate(streams):
            kept[part].append(stream.load_tokens(index))
    return kept


def finish_run(run: Run, out: Path, held_out: ActivationStream | list[torch.Tensor] | None,
               config: TrainConfig) -> Path:
    """Fold the input scale into the weights, evaluate on held-out shards (if any: a stream,
    or their tokens in memory), save."""
    sae = run.sae
    sae.fold_activation_scale()
    if isinstance(held_out, ActivationStream):
        held_out = held_out.in_order()
    metrics = reconstruction_metrics(sae, held_out) if held_out is not None else {}
    metrics["dead_fraction_training"] = float(run.dead_mask(config.dead_tokens).float().mean())
    folder = sae.save(out / run.name, firing_frequency=metrics.pop("firing_frequency", None))
    write_json(folder / "train_summary.json", {"name": run.name, "steps": config.steps,
                                              "tokens": config.steps * config.batch_size,
                                              "held_out": metrics})
    return folder
