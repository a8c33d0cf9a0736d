"""``saekit serve`` for real: the app on uvicorn over the embedded model, the shipped SAE and a
small capture; HTTP requests to every page and JSON endpoint, concurrent steering, and a real
headless Chromium driven by selenium (chromium + chromium-driver)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import saekit
from saekit import ActivationCache
from saekit.formats import load_foreign_sae
from saekit.serve import Explorer, Limits
from saekit.serve_app import free_port, start_in_thread

SAE_DIR = Path(saekit.__file__).parent / "data" / "sae" / "gemma-3-270m-blocks.6-topk-16k"
FISH, CHEESE = 7463, 11293  # features `saekit concept` chose (README)
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"
EXPLANATIONS = [
    {"feature": FISH, "explanation": f"fish and seafood {SCRIPT}",
     "scores": {"detection": {"balanced_accuracy": 0.81}}},
    {"feature": CHEESE, "explanation": f"cheese {IMG}",
     "scores": {"detection": {"balanced_accuracy": 0.74}}},
    {"feature": 5, "explanation": "the word fish in recipes", "scores": {}},
]
STEER = {"prompt": "I think that", "max_new_tokens": 8, "temperature": 0.7, "seed": 3}


@pytest.fixture(scope="module")
def sae():
    return load_foreign_sae(SAE_DIR)


@pytest.fixture(scope="module")
def explorer(model, sae, small_capture, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    path = folder / "explanations.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in EXPLANATIONS))
    from saekit.search import by_feature, load_explanations

    limits = Limits(max_new_tokens=48, max_prompt_chars=500, request_timeout=120)
    return Explorer(model, sae, ActivationCache.open(small_capture), folder / "cache",
                    by_feature(load_explanations(path)), limits)


@pytest.fixture(scope="module")
def url(explorer):
    server, address = start_in_thread(explorer)
    yield address
    server.should_exit = True


def get(url: str, path: str, **params) -> httpx.Response:
    return httpx.get(url + path, params=params, timeout=120)


def steer_json(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/api/steer", json={**STEER, **body}, timeout=300)


# --- pages and JSON ---------------------------------------------------------------------------

def test_features_are_filtered_sorted_and_paginated_on_the_server(url, sae):
    first = get(url, "/api/features", sort="-density", per_page=5).json()
    assert first["total"] == sae.d_sae and len(first["rows"]) == 5
    densities = [r["density"] for r in first["rows"]]
    assert densities == sorted(densities, reverse=True)
    second = get(url, "/api/features", sort="-density", per_page=5, page=2).json()["rows"]
    assert second[0]["density"] <= densities[-1]
    assert not {r["id"] for r in second} & {r["id"] for r in first["rows"]}
    fish = get(url, "/api/features", q="fish").json()
    assert {r["id"] for r in fish["rows"]} == {FISH, 5}
    scored = get(url, "/api/features", min_score=0.8).json()["rows"]
    assert [r["id"] for r in scored] == [FISH] and scored[0]["score"] == pytest.approx(0.81)
    assert [r["id"] for r in get(url, "/api/features", q=str(CHEESE)).json()["rows"]] == [CHEESE]
    dense = get(url, "/api/features", min_density=0.01, sort="id").json()
    assert all(r["density"] >= 0.01 for r in dense["rows"]) and 0 < dense["total"] < sae.d_sae
    page = get(url, "/features", q="fish", sort="-score")
    assert page.status_code == 200 and f'href="/feature/{FISH}"' in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text and SCRIPT not in page.text


def test_a_feature_page_is_computed_once_then_read_from_disk(url, explorer):
    feature = int(get(url, "/api/features", sort="-density", per_page=1).json()["rows"][0]["id"])
    cached = explorer.folder / f"feature_{feature}.json"
    assert not cached.exists()
    start = time.perf_counter()
    data = get(url, f"/api/feature/{feature}").json()
    cold = time.perf_counter() - start
    assert cached.is_file() and data["feature"] == feature and data["examples"]
    assert data["max"] > 0 and len(data["neighbours"]) == 10 and data["lens"]["promoted"]
    start = time.perf_counter()
    page = get(url, f"/feature/{feature}")
    warm = time.perf_counter() - start
    assert page.status_code == 200 and f"<h1>Feature {feature}</h1>" in page.text
    assert 'href="/feature/' in page.text and f"/steer?feature={feature}" in page.text
    assert warm < cold, (warm, cold)
    again = Explorer(explorer.model, explorer.sae, explorer.cache, explorer.folder.parent)
    assert again.folder == explorer.folder  # the same SAE, cache and settings: read from disk
    assert again.feature(feature) == data
    assert again.statistics.frequency.equal(explorer.statistics.frequency)
    again.worker.shutdown()
    explained = get(url, f"/feature/{FISH}").text
    assert "fish and seafood &lt;script&gt;" in explained and SCRIPT not in explained


def test_search_by_text_and_by_explanation(url):
    text = f"Smoked fish and cheddar cheese {SCRIPT}"
    result = get(url, "/api/search", text=text).json()
    assert "".join(result["tokens"]) == text
    assert len(result["firing"]) == len(result["tokens"]) and any(result["firing"])
    assert result["top"] and all(len(h["activations"]) == len(result["tokens"])
                                 for h in result["top"])
    page = get(url, "/search", text=text).text
    assert f'class="hit" href="/feature/{result["top"][0]["feature"]}"' in page
    assert SCRIPT not in page.split('<script type="application/json"')[0]
    matches = get(url, "/search", q="fish").text
    assert f'href="/feature/{FISH}"' in matches and 'href="/feature/5"' in matches


@pytest.mark.parametrize("method, path, params, status, words", [
    ("get", "/api/feature/99999", None, 404, "out of range"),
    ("get", "/feature/99999", None, 404, "out of range"),
    ("get", "/feature/abc", None, 404, "No such page"),
    ("get", "/api/features", {"sort": "bogus"}, 400, "sort must be"),
    ("get", "/api/features", {"min_density": "nan"}, 400, "finite"),
    ("get", "/api/features", {"page": "0"}, 400, "page must be"),
    ("get", "/api/features", {"per_page": "100000"}, 400, "per_page must be"),
    ("get", "/api/search", {"text": "x" * 501}, 400, "at most 500"),
    ("get", "/api/search", {"text": ""}, 400, "non-empty"),
    ("get", "/static/../pyproject.toml", None, 404, ""),
    ("get", "/static/%2e%2e%2fpyproject.toml", None, 404, "No such"),
    ("get", "/static/serve.py", None, 404, "No such"),
    ("post", "/api/steer", b"{not json", 400, "not valid JSON"),
    ("post", "/api/steer", {**STEER, "edits": [{"feature": 99999, "value": 1}]}, 400,
     "not a feature"),
    ("post", "/api/steer", {**STEER, "edits": [{"feature": FISH, "value": 1e30}]}, 400,
     "between"),
    ("post", "/api/steer", {**STEER, "edits": [{"feature": FISH, "value": "NaN"}]}, 400,
     "finite"),
    ("post", "/api/steer", {**STEER, "edits": [{"feature": FISH, "mode": "boost"}]}, 400,
     "mode must be"),
    ("post", "/api/steer", {**STEER, "max_new_tokens": 49}, 400, "max_new_tokens must be"),
    ("post", "/api/steer", {**STEER, "temperature": -1}, 400, "temperature must be"),
    ("post", "/api/steer", {**STEER, "prompt": ""}, 400, "prompt must be"),
    ("post", "/api/steer", [1, 2], 400, "JSON object"),
    ("text/plain", "/api/steer", STEER, 415, "Content-Type: application/json"),
    ("post", "/api/sweep", {**STEER, "feature": FISH, "values": [], "concept": "fish*"}, 400,
     "values must be"),
    ("post", "/api/sweep", {**STEER, "feature": FISH, "values": [1], "concept": " , "}, 400,
     "concept must"),
    ("post", "/api/sweep", {**STEER, "feature": -1, "values": [1], "concept": "fish"}, 400,
     "not a feature"),
])
def test_bad_requests_get_a_4xx_with_a_message(url, method, path, params, status, words):
    if method == "get":
        response = httpx.get(url + path, params=params, timeout=60)
    else:
        kind = "application/json" if method == "post" else method
        body = params if isinstance(params, bytes) else json.dumps(params)
        response = httpx.post(url + path, content=body, headers={"Content-Type": kind},
                              timeout=60)
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and words in response.text


# --- steering ------------------------------------------------------------------------------------

def test_concurrent_steering_requests_never_see_each_others_hooks(url, model, sae):
    """Alone (the library's generate) vs three requests at once: fish, cheese and no edit."""
    common = {k: STEER[k] for k in ("max_new_tokens", "temperature", "seed")}
    alone = {"fish": saekit.generate(model, STEER["prompt"], sae, clamp={FISH: 6.0}, **common),
             "cheese": saekit.generate(model, STEER["prompt"], sae, clamp={CHEESE: 6.0}, **common),
             "none": saekit.generate(model, STEER["prompt"], **common)}
    assert len(set(alone.values())) == 3, alone
    edits = {"fish": [{"feature": FISH, "mode": "clamp", "value": 6.0}],
             "cheese": [{"feature": CHEESE, "mode": "clamp", "value": 6.0}], "none": []}
    results: dict[str, dict] = {}
    barrier = threading.Barrier(3)

    def ask(name: str) -> None:
        barrier.wait()
        results[name] = steer_json(url, edits=edits[name]).json()

    threads = [threading.Thread(target=ask, args=(name,)) for name in edits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in edits:
        assert results[name]["steered"] == alone[name], (name, results[name])
        assert results[name]["unsteered"] == alone["none"], (name, results[name])


def events_of(response: httpx.Response):
    buffer = ""
    for chunk in response.iter_text():
        buffer += chunk
        while "\n\n" in buffer:
            part, buffer = buffer.split("\n\n", 1)
            if part.startswith("data: "):
                yield json.loads(part[6:])


def test_steering_streams_tokens_then_the_texts(url):
    body = {**STEER, "edits": [{"feature": FISH, "value": 6.0}]}
    with httpx.stream("POST", url + "/api/steer", json={**body, "stream": True},
                      timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(events_of(response))
    tokens = [e for e in events if e["type"] == "token"]
    assert {e["side"] for e in tokens} == {"unsteered", "steered"}
    assert events[-1]["type"] == "done"
    assert events[-1] == {"type": "done", **steer_json(url, edits=body["edits"]).json()}
    assert tokens[-1]["text"] == events[-1]["steered"]


def test_a_foreign_host_header_is_refused(url):
    """A page on another site reaching 127.0.0.1 through DNS rebinding sends its own Host."""
    response = httpx.get(url + "/api/status", headers={"Host": "evil.example:8000"}, timeout=60)
    assert response.status_code == 400
    assert httpx.get(url + "/api/status", timeout=60).json()["d_sae"] == 16384


def test_a_waiting_request_sees_its_place_and_a_late_one_times_out(url, explorer):
    body = {**STEER, "max_new_tokens": 48, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/api/steer", json=body, timeout=300) as first:
        events = events_of(first)
        assert next(e for e in events if e["type"] == "token")
        with httpx.stream("POST", url + "/api/steer", json={**body, "max_new_tokens": 2},
                          timeout=300) as second:
            assert next(events_of(second)) == {"type": "queued", "position": 1}
    from saekit.serve_requests import ServeError, SteerRequest

    late = SteerRequest("I think that", (), 4, 0.0, 0)
    with pytest.raises(ServeError, match="request-timeout") as refused:
        explorer.steer(late, deadline=time.monotonic() - 1)
    assert refused.value.status == 504
    wait_idle(explorer)


def wait_idle(explorer, timeout: float = 120) -> None:
    stop = time.monotonic() + timeout
    while not explorer.worker.idle and time.monotonic() < stop:
        time.sleep(0.1)
    assert explorer.worker.idle


def test_an_abandoned_generation_stops(url, explorer):
    wait_idle(explorer)
    before = explorer.cancelled
    body = {**STEER, "max_new_tokens": 48, "temperature": 0, "stream": True,
            "edits": [{"feature": FISH, "value": 6.0}]}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/api/steer", json=body, timeout=300) as response:
        for event in events_of(response):
            if event["type"] == "token":
                break  # the client leaves after its first token
    deadline = time.monotonic() + 60
    while explorer.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert explorer.cancelled == before + 1
    stopped = time.perf_counter() - start
    assert get(url, "/api/status").json()["queued"] == 0
    full = time.perf_counter()
    steer_json(url, max_new_tokens=48, temperature=0)  # the same length, run to the end
    assert stopped < time.perf_counter() - full, "the abandoned generation ran on"


@pytest.mark.parametrize("path, body, passes", [
    # a sweep of 8 values, 4 samples each (36 rows): 10 neutral texts, 48 tokens, 1 + 10 scored
    ("/api/sweep", {**STEER, "max_new_tokens": 48, "feature": FISH, "concept": "fish*",
                    "values": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], "samples": 4}, 69),
    # a steer, not streamed: 48 tokens unsteered, then 48 steered
    ("/api/steer", {**STEER, "max_new_tokens": 48, "temperature": 0,
                    "edits": [{"feature": FISH, "value": 6.0}]}, 96),
])
def test_an_abandoned_sweep_or_json_steer_stops(url, explorer, model, path, body, passes):
    """The client gives up after a second and closes its connection: the job stops
    within a few tokens, well short of the forward passes it needed, the queue empties, and
    the next request is served unsteered (no hook left on the shared model)."""
    wait_idle(explorer)
    before = get(url, "/api/status").json()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_idle(explorer, timeout=30)
    status = get(url, "/api/status").json()
    assert status["cancelled"] == before["cancelled"] + 1 and status["queued"] == 0
    ran = status["forward_passes"] - before["forward_passes"]
    assert 0 < ran < passes / 2, f"the abandoned job ran {ran} of its {passes} passes"
    time.sleep(0.5)
    assert get(url, "/api/status").json()["forward_passes"] == status["forward_passes"]
    common = {k: STEER[k] for k in ("max_new_tokens", "temperature", "seed")}
    assert steer_json(url, edits=[]).json()["unsteered"] == saekit.generate(
        model, STEER["prompt"], **common)


def test_a_job_cancelled_while_it_waits_leaves_the_queue():
    from saekit.serve import ModelWorker

    worker, gate = ModelWorker(), threading.Event()
    running, _ = worker.submit(gate.wait)
    waiting, ticket = worker.submit(lambda: 1)
    assert worker.position(ticket) == 1 and waiting.cancel()
    assert worker.position(ticket) is None and worker.queued == 0
    gate.set()
    assert running.result(10) and not worker.queued
    worker.shutdown()


def test_a_sweep_measures_the_steering_curve(url):
    body = {**STEER, "max_new_tokens": 6, "feature": FISH, "values": [2.0, 6.0],
            "concept": "fish*", "samples": 2}
    result = httpx.post(url + "/api/sweep", json=body, timeout=600).json()
    assert [p["value"] for p in result["curve"]] == [2.0, 6.0]
    assert result["baseline"]["n_generations"] == 2
    for point in [result["baseline"], *result["curve"]]:
        assert 0 <= point["mention_rate"] <= 1 and point["perplexity"] > 0
        assert len(point["samples"]) == 2


# --- the command ---------------------------------------------------------------------------------

def test_saekit_serve_command_warns_on_a_network_host_and_serves(small_capture, tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "saekit", "serve", "--sae", str(SAE_DIR), "--activations",
               str(small_capture), "--cache-dir", str(tmp_path), "--host", "0.0.0.0",
               "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("open http"):
                break
        output = "".join(lines)
        assert "warning: --host 0.0.0.0 opens the explorer" in output, output
        page = httpx.get(f"http://127.0.0.1:{port}/features", timeout=60)
        assert page.status_code == 200 and "16,384 features" in page.text
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_saekit_serve_needs_one_corpus_source(capsys):
    from saekit import cli

    assert cli.main(["serve", "--sae", str(SAE_DIR)]) == 2
    assert "--activations CACHE or captures --dataset" in capsys.readouterr().err


# --- a real browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,1000", "--no-first-run", "--disable-background-networking"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
    driver.set_page_load_timeout(300)
    yield driver
    driver.quit()


def shoot(driver, tmp_path: Path, name: str) -> None:
    """A screenshot; also into ``$SAEKIT_SCREENSHOTS`` (e.g. docs/figures) when set."""
    path = tmp_path / f"serve_{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("SAEKIT_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["SAEKIT_SCREENSHOTS"]) / path.name)


def wait_for(driver, script: str, timeout: float = 300):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def test_the_explorer_in_headless_chromium(url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    # features: filter by explanation words, open a feature
    d.get(url + "/features")
    wait_for(d, "return document.body.getAttribute('data-ready')")
    d.find_element(By.ID, "q").send_keys("fish")
    d.find_element(By.ID, "apply").click()
    wait_for(d, "return location.search.indexOf('q=fish') >= 0 && document.body.dataset.ready")
    cells = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#features td")]
    assert f"fish and seafood {SCRIPT}" in cells  # the explanation stays text
    shoot(d, tmp_path, "features")
    d.find_element(By.LINK_TEXT, str(FISH)).click()
    wait_for(d, f"return document.querySelector('h1') && document.querySelector('h1')"
                f".textContent === 'Feature {FISH}'")
    assert d.find_elements(By.CSS_SELECTOR, "svg.hist") or "Never fires" in d.page_source
    shoot(d, tmp_path, "feature")
    # search: a text with markup, click a token, follow a top feature's link
    d.get(url + "/search")
    d.find_element(By.ID, "text").send_keys(f"The smoked fish {IMG} was salty")
    d.find_element(By.ID, "go").click()
    wait_for(d, "return document.querySelector('#top') && document.body.dataset.ready")
    assert not d.find_elements(By.CSS_SELECTOR, ".tokens img, .tokens script")
    d.find_elements(By.CSS_SELECTOR, ".tokens .tok")[3].click()
    assert d.find_element(By.ID, "token-panel").text.startswith("Token 3")
    d.find_element(By.CSS_SELECTOR, "button.show").click()
    shoot(d, tmp_path, "search")
    hit = d.find_element(By.CSS_SELECTOR, "a.hit")
    feature = hit.text
    hit.click()
    wait_for(d, f"return document.querySelector('h1') && document.querySelector('h1')"
                f".textContent === 'Feature {feature}'")
    # steer, pre-filled from the feature page's link: the steered text differs
    d.get(url + f"/feature/{FISH}")
    d.find_element(By.ID, "steer-link").click()
    wait_for(d, "return document.getElementById('steer-form') && document.body.dataset.ready")
    assert d.find_element(By.NAME, "feature").get_attribute("value") == str(FISH)
    value = d.find_element(By.NAME, "value")
    value.clear()
    value.send_keys("6")
    prompt = d.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(f"I think that {IMG}")
    tokens = d.find_element(By.NAME, "max_new_tokens")
    tokens.clear()
    tokens.send_keys("12")
    d.find_element(By.ID, "run").click()
    wait_for(d, "return document.body.getAttribute('data-steered')")
    unsteered = d.find_element(By.ID, "unsteered").text
    steered = d.find_element(By.ID, "steered").text
    assert unsteered.startswith(f"I think that {IMG}") and steered.startswith("I think that")
    assert unsteered != steered
    assert not d.find_elements(By.CSS_SELECTOR, ".out img")
    assert d.execute_script("return document.getElementById('error').hidden")
    # the sweep below it: pre-filled with the feature and its concept word
    sweep = d.find_element(By.ID, "sweep-form")
    assert sweep.find_element(By.NAME, "feature").get_attribute("value") == str(FISH)
    values = sweep.find_element(By.NAME, "values")
    values.clear()
    values.send_keys("3,6")
    samples = sweep.find_element(By.NAME, "samples")
    samples.clear()
    samples.send_keys("1")
    tokens.clear()
    tokens.send_keys("6")
    d.find_element(By.ID, "run-sweep").click()
    wait_for(d, "return document.body.getAttribute('data-swept')", 600)
    assert len(d.find_elements(By.CSS_SELECTOR, "#sweep-chart polyline")) == 2
    assert len(d.find_elements(By.CSS_SELECTOR, "#sweep-table tr")) == 3
    shoot(d, tmp_path, "steer")
