"""Bad input and faults: saekit's own errors give one clean line and exit 2, bugs keep their
traceback; damaged SAE folders and torn logs are named or repaired, never a raw traceback."""

from __future__ import annotations

import json

import pytest

from saekit import cli
from saekit.errors import SaekitError
from saekit.sae import SAEConfig, SAEMetadata, TopKSAE, load_sae
from saekit.sae.base import CFG_FILENAME, WEIGHTS_FILENAME
from saekit.train import truncate_metrics


def run_raising(monkeypatch, error: BaseException, argv=("hooks",)) -> int:
    def boom(args):
        raise error

    monkeypatch.setattr(cli, "run_hooks", boom)
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
    sae = TopKSAE(SAEConfig("topk", 16, 32, k=4, metadata=SAEMetadata(
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


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    log.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # a full disk cut the last line
    truncate_metrics(log, step=2)
    assert log.read_text() == "\n".join(lines[:2]) + "\n"
    truncate_metrics(log, step=9)  # idempotent, nothing torn left
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
