"""Static dashboards rendered in real headless Chromium: tokens, links, and no injection."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from saekit import ActivationCache, CaptureConfig, capture_activations
from saekit import analyse as A
from saekit.dashboard import parse_features, write_dashboard
from saekit.sae import sae_config, SAEMetadata, TopKSAE

HOOK = "blocks.3.hook_resid_post"
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"
DOCUMENTS = [
    f"Visitors typed {SCRIPT} into the guest book, then {IMG} as their name.",
    "The Golden Gate Bridge is a suspension bridge spanning the strait in San Francisco.",
    f"A second post said {IMG} and later {SCRIPT} again & again.",
    "Mix the flour, sugar and butter, then bake the dough for twenty minutes.",
] * 6


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                      else None)
        if path:
            return path
    return None


def chromium(url: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    browser = find_chromium()
    if browser is None:
        pytest.skip("headless Chromium not found: apt-get install -y chromium")
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
               "--window-size=1200,900", "--enable-logging=stderr", "--v=0", *flags, url]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class DomSummary(HTMLParser):
    """Elements, attributes, page title, and the text of ``.tok`` spans per ``.ex`` example."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.examples: list[str] = []
        self.title = ""
        self.stack: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        if "ex" in classes:
            self.examples.append("")
        if tag not in ("meta", "link", "br", "input", "img", "hr"):
            self.stack.append("tok" if "tok" in classes else tag)

    def handle_endtag(self, tag):
        if self.stack and tag not in ("meta", "link", "br", "input", "img", "hr"):
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "tok":
            self.examples[-1] += data
        if self.stack and self.stack[-1] == "title" and "head" in self.stack:
            self.title += data


@pytest.fixture(scope="module")
def dashboard(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    config = CaptureConfig(dataset=str(corpus), hooks=[HOOK], tokens=12 * 64, context=64,
                           batch_rows=4, shard_rows=8)
    cache = ActivationCache.open(capture_activations(config, folder / "acts", model=model))
    torch.manual_seed(0)
    sae = TopKSAE(sae_config("topk", cache.d_model, 128, k=8,
                            metadata=SAEMetadata(model_name="gemma-3-270m", hook_name=HOOK)))
    sae.init_from_data(cache.load_shard(0).reshape(-1, cache.d_model))
    # the features whose top example shows the malicious strings, plus a few others
    top = A.top_activating_examples(sae, cache, range(128), n_examples=1,
                                    tokenizer=model.tokenizer)
    hostile = [f for f, ex in top.items() if ex and "alert" in "".join(ex[0].tokens)]
    features = list(dict.fromkeys(hostile[:4] + [0, 1, 2]))
    out = write_dashboard(folder / "site", model, sae, cache, features, n_examples=8,
                          n_samples=40, map_neighbours=10)
    return out, features, hostile[:4]


def test_files_are_escaped(dashboard):
    out, features, hostile = dashboard
    assert hostile, "no feature fired most on the malicious documents"
    assert sorted(p.name for p in out.glob("*.html")) == \
        sorted(["index.html"] + [f"feature_{f}.html" for f in features])
    for page in out.glob("*.html"):
        text = page.read_text()
        assert "<script>alert" not in text and "<img" not in text and "onerror=" not in text
        assert "src=" not in text and "http" not in text.replace("http://www.w3.org", "")


def test_rendered_in_chromium(dashboard, tmp_path):
    out, features, hostile = dashboard
    feature = hostile[0]
    page = (out / f"feature_{feature}.html").resolve()
    result = chromium(page.as_uri(), tmp_path, "--dump-dom")
    dom = DomSummary(result.stdout)
    assert dom.title == f"Feature {feature}"  # an alert() or injected script did not change it
    toks = [a for t, a in dom.tags if "tok" in (a.get("class") or "").split()]
    assert len(toks) >= 10 and all(float(a["title"]) >= 0 for a in toks)
    assert any(float(a["title"]) > 0 and "rgba(255, 120, 0" in a["style"] for a in toks)
    shown = "\n".join(dom.examples)
    assert "alert(" in shown and ("<script>" in shown or "<img" in shown)
    assert "&lt;" in result.stdout  # the markup is serialised as escaped text
    assert '<img src="x"' not in result.stdout and "<script>alert" not in result.stdout
    assert not [t for t, a in dom.tags if t in ("img", "script", "iframe", "object")]
    assert not [k for _, a in dom.tags for k in a if k.startswith("on")]

    index = chromium((out / "index.html").resolve().as_uri(), tmp_path, "--dump-dom")
    idx = DomSummary(index.stdout)
    links = {a["href"] for t, a in idx.tags if t == "a"}
    assert {f"feature_{f}.html" for f in features} <= links
    body = next(a for t, a in idx.tags if t == "body")
    assert body.get("data-ready") == "1", "the index's script did not run"
    scripts = [a for t, a in idx.tags if t == "script"]
    assert len(scripts) == 2 and scripts[0].get("type") == "application/json"
    assert "&lt;script&gt;alert(1)" in index.stdout or "&lt;img src=x" in index.stdout
    assert not [t for t, a in idx.tags if t in ("img", "iframe", "object")]
    assert not [k for _, a in idx.tags for k in a if k.startswith("on")]

    hidden = chromium((out / "index.html").resolve().as_uri() + "#q=zzznothing", tmp_path,
                      "--dump-dom")
    rows = [a for t, a in DomSummary(hidden.stdout).tags if t == "tr" and "data-i" in a]
    assert len(rows) == len(features) and all("hidden" in a for a in rows)

    shot = tmp_path / "feature.png"
    chromium(page.as_uri(), tmp_path, f"--screenshot={shot}")
    import matplotlib.image

    pixels = torch.as_tensor(matplotlib.image.imread(shot))
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 0.01


def test_parse_features():
    assert parse_features("0:3,7,2", 10) == [0, 1, 2, 7]
    assert parse_features("8:", 10) == [8, 9]
    with pytest.raises(A.FeatureIndexError, match="d_sae = 10"):
        parse_features("5,10", 10)
    with pytest.raises(A.FeatureIndexError, match="ids and ranges"):
        parse_features("a:b", 10)
