"""The OpenAI-compatible explainer/judge (issue 13) against a real local server: the xllamacpp
wheel (llama.cpp's server) serving the SmolLM2 GGUF on 127.0.0.1, started in a subprocess by the
``server`` fixture and stopped after the module; it requires an API key, as a hosted API would.
Also bad input: an unreachable endpoint, a missing or wrong key, no log-probabilities, the
openai package missing, and flags that do not go together."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from saekit import cli
from saekit.errors import ModelLoadError
from saekit.explain import score_explanation
from saekit.explain_judges import QuestionJudge
from saekit.explain_run import (EXPLANATIONS, SUMMARY, ExplainConfig, explain_features,
                                read_explanations)
from saekit.explainer_model import explainer_gguf, load_explainer
from saekit.explainer_openai import (EndpointError, RateLimit, endpoint_options,
                                     load_openai_explainer, yes_share)
from test_explain import (CHEESE, OTHER, SHIPPED_SAE, SMALL, live_features,  # noqa: F401
                                shipped_sae)

KEY, KEY_ENV = "saekit-test-key", "SAEKIT_TEST_API_KEY"
SERVE = """
import sys
import xllamacpp
params = xllamacpp.CommonParams()
params.model.path = sys.argv[1]
params.hostnames, params.port, params.api_keys = ["127.0.0.1"], 0, [sys.argv[2]]
params.n_ctx, params.n_parallel = 8192, 2
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
server = xllamacpp.Server(params)
print(server.listening_address, flush=True)
sys.stdin.read()  # serve until the test closes stdin (or dies)
"""


def wait_healthy(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """``http://127.0.0.1:PORT/v1`` of a llama.cpp server (xllamacpp) serving SmolLM2 on a free
    port, requiring the API key ``KEY``."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(explainer_gguf()), KEY],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                               text=True)
    try:
        address = process.stdout.readline().strip()
        assert address.startswith("http://127.0.0.1:"), \
            f"the xllamacpp server did not start (pip install -e '.[dev]' installs it): " \
            f"{address!r}, log: {log_path.read_text()[-2000:]}"
        wait_healthy(address)
        yield address + "/v1"
    finally:
        process.stdin.close()
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def explainer(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return load_explainer("openai", model="smollm2", base_url=server, api_key_env=KEY_ENV)


def test_explanations_through_the_server_are_stored_like_local_ones(
        server, explainer, shipped_sae, small_capture, live_features, model, tmp_path):
    out = tmp_path / "out"
    explain_features(shipped_sae, small_capture, live_features, out, explainer, model.tokenizer,
                     "shipped", model=model, **SMALL)
    records = read_explanations(out / EXPLANATIONS)
    assert [r["feature"] for r in records] == live_features
    for r in records:
        assert r["explanation"] and len(r["explanation"]) <= 120
        assert r["explainer"] == f"smollm2@{server}" == explainer.model_id
        assert r["examples"]["shown"] and len(r["examples"]["non_activating"]) == 2
        assert 0 <= r["scores"]["detection"]["auroc"] <= 1
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["n_features"] == summary["n_scored"] == 2
    assert summary["explainer"] == explainer.model_id
    explain_features(shipped_sae, small_capture, live_features, out, explainer, model.tokenizer,
                     "shipped", model=model, **SMALL)  # all stored: nothing new
    assert read_explanations(out / EXPLANATIONS) == records


def test_the_command_flags_reach_the_endpoint(server, monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    config = ExplainConfig(sae=str(SHIPPED_SAE), activations=str(tmp_path), out=str(tmp_path),
                           explainer="openai", model="smollm2", base_url=server + "/",
                           api_key_env=KEY_ENV, request_timeout=30, max_retries=1,
                           requests_per_minute=600, parallel_requests=2)
    judge = load_explainer(config.explainer, config.device, **endpoint_options(config))
    assert judge.model_id == f"smollm2@{server}" and judge.parallel_requests == 2
    assert judge.client.max_retries == 1 and judge.rate.interval == pytest.approx(0.1)
    assert len(judge.generate([[{"role": "user", "content": "Name a cheese."}]] * 2, 8)) == 2


def test_the_served_judge_tells_cheese_texts_from_others(explainer):
    """Measured over runs: P(yes) 0.48-0.54 on the cheese texts, 0.40-0.50 on the others
    (means 0.51-0.52 vs 0.44-0.45), AUROC 0.94-1.0. The values move by a few hundredths with the
    server's prompt cache and batching, so the asserts leave room."""
    score = score_explanation(QuestionJudge(explainer), "the word cheese", CHEESE, OTHER)
    p_yes = score.p_yes_activating + score.p_yes_non_activating
    assert all(0 <= p <= 1 for p in p_yes) and len(p_yes) == 8
    assert score.auroc >= 0.75
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert mean(score.p_yes_activating) > mean(score.p_yes_non_activating) + 0.03


def test_an_unreachable_endpoint_fails_fast_and_writes_nothing(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    started = time.monotonic()
    code = cli.main(["explain", "--sae", str(SHIPPED_SAE), "--activations", str(tmp_path / "a"),
                     "--out", str(out), "--explainer", "openai", "--model", "m",
                     "--base-url", f"http://127.0.0.1:{port}/v1", "--max-retries", "2"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and "Could not reach" in err and "3 tries" in err and "Traceback" not in err
    assert seconds < 20, seconds
    assert not out.exists()


def test_a_missing_or_wrong_key_names_the_variable(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(EndpointError, match=f"{KEY_ENV} is not set"):
        load_openai_explainer("smollm2", server, api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(EndpointError, match=f"{KEY_ENV} holds a key it refused"):
        load_openai_explainer("smollm2", server, api_key_env=KEY_ENV)


def test_openai_without_a_key_is_refused_before_any_request(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(EndpointError, match=f"set the environment variable {KEY_ENV}"):
        load_openai_explainer("gpt-4o-mini", api_key_env=KEY_ENV, max_retries=0)


def test_a_reply_without_logprobs_is_a_clear_error(explainer):
    reply = explainer.complete([{"role": "user", "content": "Yes or no?"}], max_tokens=1)
    with pytest.raises(EndpointError, match="no log-probabilities.*--score none"):
        yes_share(reply, explainer.where)


def test_the_missing_openai_package_says_which_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ModelLoadError, match="pip install 'openai>="):
        load_explainer("openai", model="m", base_url="http://127.0.0.1:1/v1")


def test_the_rate_limit_spaces_requests():
    limit = RateLimit(per_minute=240)  # one every 0.25 s
    started = time.monotonic()
    for _ in range(4):
        limit.wait()
    assert 0.7 < time.monotonic() - started < 2


@pytest.mark.parametrize("flags, named", [
    (["--explainer", "openai"], "--model"),
    (["--model", "gpt-4o-mini"], "--explainer openai"),
    (["--explainer", "openai", "--model", "m", "--base-url", "localhost:8000"], "--base-url"),
    (["--explainer", "openai", "--model", "m", "--request-timeout", "0"], "--request-timeout"),
    (["--explainer", "openai", "--model", "m", "--max-retries", "99"], "--max-retries"),
    (["--explainer", "openai", "--model", "m", "--requests-per-minute", "-1"],
     "--requests-per-minute"),
])
def test_endpoint_flags_that_do_not_fit_are_refused(tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    code = cli.main(["explain", "--sae", str(SHIPPED_SAE), "--activations", str(tmp_path / "a"),
                     "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not out.exists()
