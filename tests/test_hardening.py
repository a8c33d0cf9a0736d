"""Bad input and faults: saekit's own errors give one clean line and exit 2, bugs keep their
traceback; damaged SAE folders and torn logs are named or repaired, never a raw traceback."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import torch

import pytest

from saekit import cli
from saekit.capture import CaptureConfig, capture_activations
from saekit.commands import COMMANDS
from saekit.config import flag_name
from saekit.errors import ConfigError, SaekitError
from saekit.sae import ARCHITECTURES, SAEMetadata, TopKSAE, load_sae, sae_config
from saekit.sae.base import CFG_FILENAME, WEIGHTS_FILENAME
from saekit.dashboard import DashboardConfig
from saekit.explain_run import ExplainConfig
from saekit.generation import SteerConfig
from saekit.search import SearchConfig
from saekit.serve import ServeConfig
from saekit.steer_eval import SteerEvalConfig
from saekit.train import TrainConfig, truncate_metrics


def run_raising(monkeypatch, error: BaseException, argv=("hooks",)) -> int:
    from saekit import commands

    def boom(config):
        raise error

    monkeypatch.setattr(commands, "COMMANDS", tuple(
        dataclasses.replace(c, run=boom) if c.name == argv[0] else c for c in commands.COMMANDS))
    return cli.main(list(argv))


def test_cli_reports_saekit_and_os_errors_and_lets_bugs_through(monkeypatch, capsys):
    assert run_raising(monkeypatch, SaekitError("the flag --x must be > 0, got -1")) == 2
    assert capsys.readouterr().err == "saekit hooks: error: the flag --x must be > 0, got -1\n"
    assert run_raising(monkeypatch, FileNotFoundError(2, "No such file", "/nope/out")) == 2
    assert "/nope/out" in capsys.readouterr().err
    assert run_raising(monkeypatch, KeyboardInterrupt()) == 130
    with pytest.raises(ValueError, match="a bug"):  # not saekit's: the traceback stays
        run_raising(monkeypatch, ValueError("a bug"))
    with pytest.raises(KeyError):
        run_raising(monkeypatch, KeyError("fvu"))


@pytest.fixture
def saved(tmp_path):
    sae = TopKSAE(sae_config("topk", 16, 32, k=4, metadata=SAEMetadata(
        model_name="gemma-3-270m", hook_name="blocks.6.hook_resid_post")))
    return sae.save(tmp_path / "sae")


def test_malformed_cfg_json_names_the_file(saved, capsys):
    (saved / CFG_FILENAME).write_text('{"d_in": 16,, }')
    with pytest.raises(SaekitError, match=f"{CFG_FILENAME} is not valid JSON"):
        load_sae(saved)
    assert cli.main(["steer", "--sae", str(saved), "--feature", "0", "--value", "1",
                     "--prompt", "x"]) == 2
    assert str(saved / CFG_FILENAME) in capsys.readouterr().err


def test_truncated_weights_name_the_file(saved, capsys):
    weights = saved / WEIGHTS_FILENAME
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(SaekitError, match="damaged or truncated"):
        load_sae(saved)
    assert cli.main(["dashboard", "--sae", str(saved), "--activations", "none",
                     "--out", str(saved.parent / "dash")]) == 2
    assert str(weights) in capsys.readouterr().err
    assert not (saved.parent / "dash").exists()


def test_cfg_whose_width_disagrees_with_the_weights(saved):
    cfg = json.loads((saved / CFG_FILENAME).read_text())
    cfg["d_in"] = 24
    (saved / CFG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(SaekitError, match=r"do not match cfg.json \(d_in 24"):
        load_sae(saved)


def test_weights_changed_after_saving_are_refused(saved, capsys):
    """A flipped bit inside a tensor still parses as safetensors; the sha256 that cfg.json
    records at save catches it, and saekit names the file."""
    weights = saved / WEIGHTS_FILENAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's values
    weights.write_bytes(bytes(data))
    with pytest.raises(SaekitError, match="does not match the sha256"):
        load_sae(saved)
    assert cli.main(["steer", "--sae", str(saved), "--feature", "0", "--value", "1",
                     "--prompt", "x"]) == 2
    assert str(weights) in capsys.readouterr().err
    cfg = json.loads((saved / CFG_FILENAME).read_text())
    del cfg["weights_sha256"]  # as SAELens and older saekit folders have it: not checked
    (saved / CFG_FILENAME).write_text(json.dumps(cfg))
    assert load_sae(saved).d_sae == 32


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    log.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # a full disk cut the last line
    truncate_metrics(log, step=2)
    assert log.read_text() == "\n".join(lines[:2]) + "\n"
    truncate_metrics(log, step=9)  # idempotent, nothing torn left
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


# every sub-command's configs and every architecture's: a new command or field is walked too
CONFIGS = list(dict.fromkeys([*(c for command in COMMANDS for c in command.configs),
                              *(sae_class.config_class for sae_class in ARCHITECTURES.values())]))
# the other fields' values while one field is walked (required ones have no usable default)
VALID = {DashboardConfig: {"dataset": "default"}, ExplainConfig: {"dataset": "default"},
         ServeConfig: {"dataset": "default"},
         SteerConfig: {"feature": 0, "value": 1.0},
         SearchConfig: {"explanations": "explanations.jsonl", "query": "cheese"},
         SteerEvalConfig: {"feature": 0, "values": [1.0]}}
HOSTILE = [0, -1, 1.5, float("nan"), float("inf"), float("-inf"), 10 ** 30, "x", None, True]


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_rejects_hostile_values_cleanly(config_class):
    """Each field, given each hostile value: the config is built (the value is in the field's
    domain) or ConfigError names the flag; never another exception, never NaN/inf accepted."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if not f.metadata.get("cli", True):  # TrainConfig.options: the architecture configs'
            continue
        for value in HOSTILE:
            given = [value] if typing.get_origin(hints[f.name]) is list else value
            try:
                config = config_class(**{**VALID.get(config_class, {}), f.name: given})
            except ConfigError as err:
                assert flag_name(f) in str(err), (f.name, value, err)
                continue
            except SaekitError:  # a cross-field rule of the config (e.g. tokens < context)
                continue
            kept = getattr(config, f.name)
            for item in kept if isinstance(kept, list) else [kept]:
                assert not (isinstance(item, float) and not math.isfinite(item)), (f.name, value)
            rule = f.metadata.get("domain")
            if rule is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert rule.admits(value), (f.name, value)


@pytest.mark.parametrize("argv", [
    ["cache", "--batch-rows", "-4", "--tokens", "2048"],
    ["cache", "--batch-rows", "0", "--tokens", "2048"],
    ["train", "--activations", "A", "--lr", "inf"],
    ["train", "--activations", "A", "--aux-coefficient", "nan"],
    ["train", "--activations", "A", "--checkpoint-every", "0"],
    ["train", "--activations", "A", "--log-every", "0"],
])
def test_bad_flags_fail_before_any_work(argv, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(argv + ["--out", str(out)]) == 2
    flag = next(a for a in argv[1:] if a.startswith("--") and a not in ("--tokens", "--activations"))
    assert flag in capsys.readouterr().err
    assert not out.exists()


def outside(rule, kind) -> list:
    """Values just outside ``rule`` (a ``Domain``) for a field of scalar type ``kind``, and
    the non-finite ones a float field refuses."""
    if rule is None or rule.choices is not None:
        return []
    step = 1 if kind is int else 0.5
    values = [b for b in (rule.gt, rule.lt) if b is not None]
    values += [rule.ge - step] if rule.ge is not None else []
    values += [rule.le + step] if rule.le is not None else []
    values = [int(v) if kind is int else v for v in values]
    return values + (["nan", "inf"] if kind is float else [])


def walked_flags() -> list[tuple[str, str, object]]:
    """``(command, flag, value)`` for every bounded flag of every sub-command (architecture
    settings included), each value outside the flag's domain."""
    from saekit.cli import _scalar_type
    from saekit.config import flag_name
    from saekit.sae import architecture_settings

    cases = []
    for command in COMMANDS:
        fields = [(f, c) for c in command.configs for f in dataclasses.fields(c)
                  if f.metadata.get("cli", True)]
        if any(f.metadata.get("architecture_settings") for c in command.configs
               for f in dataclasses.fields(c)):
            fields += [(owners[0][1], ARCHITECTURES[owners[0][0]].config_class)
                       for owners in architecture_settings().values()]
        for f, config_class in fields:
            kind = typing.get_type_hints(config_class)[f.name]
            kind = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
            for value in outside(f.metadata.get("domain"), _scalar_type(kind)):
                cases.append((command.name, flag_name(f), value))
    return cases


def required_flags(name: str) -> list[str]:
    command = next(c for c in COMMANDS if c.name == name)
    return [a for c in command.configs for f in dataclasses.fields(c)
            if f.metadata.get("required") for a in (flag_name(f), "x")]


@pytest.mark.parametrize("name, flag, value", [
    pytest.param(*case, id=f"{case[0]} {case[1]}={case[2]}") for case in walked_flags()])
def test_every_flag_of_every_command_refuses_values_outside_its_domain(name, flag, value,
                                                                       capsys):
    """Each bounded flag of each sub-command, given a value outside its domain: exit 2 with a
    message naming the flag, before any work, never a traceback. New flags are walked too."""
    argv = [name, *required_flags(name), flag, str(value)]
    try:
        code = cli.main(argv)
    except SystemExit as stopped:  # argparse refused the value's type
        code = stopped.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert flag in err and "Traceback" not in err, (argv, err)


def test_context_longer_than_the_model_takes(model, tmp_path):
    with pytest.raises(ConfigError, match="maximum context of 32768"):
        capture_activations(CaptureConfig(context=100_000, tokens=100_000), tmp_path / "c",
                            model=model)


@pytest.mark.parametrize("flags, named", [(["--n-examples", "-1"], "--n-examples"),
                                          (["--max-rows", "-1"], "--max-rows"),
                                          (["--max-rows", "0"], "--max-rows")])
def test_dashboard_counts_below_one_are_refused(saved, small_capture, tmp_path, capsys, flags,
                                                named):
    """Issue 12 items 7 and 8: -1 examples crashed; -1 rows wrote 'never fires' pages, exit 0."""
    out = tmp_path / "dash"
    assert cli.main(["dashboard", "--sae", str(saved), "--activations", str(small_capture),
                     "--features", "0:2", "--out", str(out), *flags]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


def test_a_second_writer_on_one_folder_is_refused(small_capture, tmp_path, capsys):
    """Issue 12 item 4: a second `saekit cache` on the same --out deleted the first run's temp
    shard. Now each run holds a lock on its folder: a second cache or train run is refused at
    once, touching nothing, and the first (here: the lock held by this test) is unharmed."""
    from saekit.files import LOCK_FILE, output_lock

    cache_out, train_out = tmp_path / "cache", tmp_path / "train"
    with output_lock(cache_out, "cache"), output_lock(train_out, "train"):
        (cache_out / "shard_00000.safetensors.tmp-abc").write_bytes(b"in flight")
        assert cli.main(["cache", "--tokens", "256", "--context", "64", "--out",
                         str(cache_out)]) == 2
        assert "in use by another saekit cache" in capsys.readouterr().err
        assert (cache_out / "shard_00000.safetensors.tmp-abc").read_bytes() == b"in flight"
        assert cli.main(["train", "--activations", str(small_capture), "--out", str(train_out),
                         "--tokens", "1024", "--batch-size", "64"]) == 2
        assert "in use by another saekit train" in capsys.readouterr().err
        assert [p.name for p in train_out.iterdir()] == [LOCK_FILE]
    # released: the same training runs
    assert cli.main(["train", "--activations", str(small_capture), "--out", str(train_out),
                     "--hook", "blocks.6.hook_resid_post", "--latents", "64", "--k", "4",
                     "--tokens", "1024", "--batch-size", "64", "--holdout-tokens", "0"]) == 0


def test_a_dataset_that_is_not_utf8_is_named(tmp_path):
    from saekit.corpus import load_corpus
    from saekit.errors import CorpusError

    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(range(128, 256)) * 20)
    with pytest.raises(CorpusError, match=f"{noise}.* is not UTF-8 text"):
        next(iter(load_corpus(str(noise))))


def test_outputs_that_cannot_be_written_fail_before_the_work(saved, tmp_path, capsys):
    """Issue 12 item 10: eval and steer-eval did all their work, then lost it at the final
    write. A file where a folder must go (or the reverse) is now refused before any work."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["eval", "--sae", str(saved), "--out", str(blocker / "eval.json")]) == 2
    assert f"{blocker} is a file" in capsys.readouterr().err
    assert cli.main(["steer-eval", "--sae", str(saved), "--feature", "0", "--concept", "x",
                     "--values", "1", "--out", str(blocker)]) == 2
    assert f"{blocker} is a file" in capsys.readouterr().err
    assert cli.main(["eval", "--sae", str(saved), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_the_output_lock_leaves_nothing_behind(tmp_path):
    """Review of issue 12: parent folders a run created stayed behind. (A folder that existed
    keeps its lock file: removing a file another run may have opened would let two in.)"""
    from saekit.files import output_lock

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "data.txt").write_text("the user's")
    with pytest.raises(RuntimeError), output_lock(existing, "cache"):
        raise RuntimeError("refused: the folder holds something else")
    assert sorted(p.name for p in existing.iterdir()) == [".saekit-lock", "data.txt"]
    nested = tmp_path / "a" / "b" / "c"
    with output_lock(nested, "train"):
        pass
    assert not (tmp_path / "a").exists()
    with output_lock(nested, "train"):
        (nested / "written").write_text("1")
    assert sorted(p.name for p in nested.iterdir()) == [".saekit-lock", "written"]


def test_config_fields_take_numpy_numbers_paths_and_devices():
    """Review of issue 12: values a Python caller naturally passes are taken as their plain
    equivalents; a number too large for a float is a ConfigError, not an OverflowError."""
    import numpy as np

    config = TrainConfig(activations=Path("cache"), out=Path("out"), tokens=np.int64(4096),
                         lr=np.float32(0.002), latents=[np.int64(64)], device=torch.device("cpu"))
    assert (config.activations, config.out, config.tokens, config.device) == \
        ("cache", "out", 4096, "cpu")
    assert type(config.tokens) is int and type(config.latents[0]) is int
    assert type(config.lr) is float and config.lr == pytest.approx(0.002)
    with pytest.raises(ConfigError, match="--lr must be a finite number"):
        TrainConfig(lr=10 ** 400)
    with pytest.raises(ConfigError, match="--tokens takes a whole number"):
        TrainConfig(tokens=np.float64(4096.5))


def test_a_diverging_run_stops_with_the_step_and_saves_nothing(small_capture, tmp_path, capsys):
    """A learning rate that is finite but absurd makes the loss overflow: the run stops at the
    step it happened, names the SAE and the loss, and saves no SAE with NaN weights."""
    out = tmp_path / "train"
    code = cli.main(["train", "--activations", str(small_capture), "--out", str(out),
                     "--hook", "blocks.6.hook_resid_post", "--latents", "64", "--k", "4",
                     "--tokens", "1024", "--batch-size", "64", "--holdout-tokens", "0",
                     "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite at step" in err and "topk_w64_k4" in err, err
    assert "Traceback" not in err
    assert not (out / "topk_w64_k4" / WEIGHTS_FILENAME).exists()  # its metrics.jsonl only
    # nothing blocks the rerun with a sane learning rate
    args = ["train", "--activations", str(small_capture), "--out", str(out), "--hook",
            "blocks.6.hook_resid_post", "--latents", "64", "--k", "4", "--tokens", "1024",
            "--batch-size", "64", "--holdout-tokens", "0"]
    assert cli.main(args) == 0
    assert load_sae(out / "topk_w64_k4").W_dec.isfinite().all()
