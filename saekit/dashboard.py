"""Static HTML feature dashboards: ``index.html`` and one ``feature_<id>.html`` per feature.

Pages are self-contained (inline CSS, inline SVG, a few lines of plain inline JS on the
index; no CDN) and open offline. Every string from the corpus or the tokenizer goes
through ``html.escape``; data for JS sits in a ``<script type="application/json">`` block
with ``<``, ``>`` and ``&`` written as ``\\u003c`` etc., and is only ever read as text.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit import analyse, directions
from saekit.analyse import Example, FeatureIndexError, QuantileBand
from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.errors import ConfigError
from saekit.formats import SAE_HELP

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { cursor: pointer; background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ex { font-family: ui-monospace, monospace; font-size: 13px; margin: 2px 0; white-space: pre-wrap; }
.meta { color: #888; display: inline-block; min-width: 9em; }
.tok { border-radius: 2px; }
.tok.max { outline: 1px solid #b40; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; }
.cols > div { flex: 1; min-width: 280px; }
.lens td:last-child { text-align: right; }
h2 { font-size: 1.1em; margin-top: 1.4em; border-bottom: 1px solid #ccc; }
#filter { width: 24em; padding: 4px; margin: 0.5em 0; }
"""

INDEX_JS = """
(function () {
  var data = JSON.parse(document.getElementById("feature-data").textContent);
  var body = document.querySelector("#features tbody");
  var rows = Array.prototype.slice.call(body.rows);
  var box = document.getElementById("filter");
  function apply() {
    var q = box.value.toLowerCase().trim(), shown = 0;
    rows.forEach(function (row) {
      var d = data[row.getAttribute("data-i")];
      var hit = !q || d.search.indexOf(q) >= 0 || String(d.id) === q.replace("#", "");
      row.hidden = !hit;
      if (hit) shown += 1;
    });
    document.getElementById("count").textContent = shown + " of " + rows.length + " features";
  }
  document.querySelectorAll("#features th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key"), sign = th.classList.toggle("asc") ? 1 : -1;
      rows.sort(function (a, b) {
        return sign * (data[a.getAttribute("data-i")][key] - data[b.getAttribute("data-i")][key]);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  box.addEventListener("input", apply);
  var m = /^#q=(.*)$/.exec(location.hash);
  if (m) { box.value = decodeURIComponent(m[1]); }
  apply();
  document.body.setAttribute("data-ready", "1");
})();
"""


@dataclass
class DashboardConfig:
    """What ``saekit dashboard`` writes (its flags are these fields)."""

    sae: str = setting("", SAE_HELP, required=True)
    activations: str | None = setting(None, "activation cache at the SAE's hook (or --dataset)")
    dataset: str | None = setting(None, "corpus to capture into OUT/.activations: 'default', "
                                  "a local file or a dataset name (or --activations)")
    tokens: int = setting(200_000, "tokens to capture with --dataset", ge=1)
    features: str = setting("0:100", "feature ids and ranges, e.g. 0:200,512 ('all': every one)")
    out: str = setting("", "folder for index.html and the feature pages", required=True)
    n_examples: int = setting(20, "top-activating examples per feature", ge=1)
    max_rows: int | None = setting(None, "scan only the first rows of the cache", ge=1)
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        check_corpus_source(self, "dashboard")


def check_corpus_source(config, command: str) -> None:
    """A config reads ``activations`` or captures ``dataset``: exactly one of them."""
    if (config.activations is None) == (config.dataset is None):
        raise ConfigError(f"saekit {command} reads --activations CACHE or captures "
                          "--dataset NAME: give exactly one of them.")


def esc(text: object) -> str:
    """``text`` safe for HTML text and quoted attributes."""
    return html.escape(str(text), quote=True)


def json_for_script(data: object) -> str:
    """JSON safe inside ``<script type="application/json">``."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def shown_token(token: str) -> str:
    return token.replace("\n", "\u23ce").replace("\t", "\u2192").replace("\r", "")


def page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"{script}</body></html>\n")


def example_html(example: Example, scale: float) -> str:
    """One example as ``.tok`` spans, background ∝ activation, activation in ``title``."""
    spans = []
    for i, (token, act) in enumerate(zip(example.tokens, example.activations)):
        alpha = min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0
        hot = " max" if example.start + i == example.position else ""
        spans.append(f'<span class="tok{hot}" title="{act:.3f}" style="background-color: '
                     f'rgba(255, 120, 0, {alpha:.2f})">{esc(shown_token(token))}</span>')
    meta = f"row {example.row}:{example.position} · {example.max_activation:.3f}"
    return f'<div class="ex"><span class="meta">{esc(meta)}</span>{"".join(spans)}</div>'


def histogram_svg(counts: torch.Tensor, edges: torch.Tensor, width: int = 520,
                  height: int = 130) -> str:
    """Bars of nonzero-activation counts on log-spaced ``edges``, from the first to the last
    nonempty bin."""
    nonzero = counts.nonzero().flatten()
    if len(nonzero) == 0:
        return "<p>Never fires on the scanned tokens.</p>"
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    counts, top = counts[lo:hi].tolist(), float(counts.max())
    bar = (width - 20) / len(counts)
    rects = []
    for i, count in enumerate(counts):
        h = (height - 30) * count / top
        rects.append(f'<rect x="{10 + i * bar:.1f}" y="{height - 20 - h:.1f}" '
                     f'width="{max(bar - 1, 1):.1f}" height="{h:.1f}" fill="#e07020"><title>'
                     f"{count} in [{edges[lo + i]:.3g}, {edges[lo + i + 1]:.3g})</title></rect>")
    labels = (f'<text x="10" y="{height - 5}" font-size="11">{edges[lo]:.3g}</text>'
              f'<text x="{width - 10}" y="{height - 5}" font-size="11" text-anchor="end">'
              f"{edges[hi]:.3g}</text>")
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(rects)}{labels}</svg>'
            "<p>Activation (log scale) of tokens where the feature fires.</p>")


def map_svg(ids: torch.Tensor, coords: torch.Tensor, linked: set[int], size: int = 300) -> str:
    """Feature (red) and neighbours placed by PCA of decoder rows; dots link to pages."""
    span = (coords.max(0).values - coords.min(0).values).clamp_min(1e-6)
    xy = (coords - coords.min(0).values) / span * (size - 20) + 10
    dots = []
    for n, (feature, (x, y)) in enumerate(zip(ids.tolist(), xy.tolist())):
        circle = (f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="{6 if n == 0 else 4}" '
                  f'fill="{"#c00" if n == 0 else "#38c"}"><title>feature {feature}</title></circle>')
        dots.append(f'<a href="feature_{feature}.html">{circle}</a>' if feature in linked and n
                    else circle)
    return (f'<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
            f'xmlns="http://www.w3.org/2000/svg" style="border:1px solid #ddd">'
            f'{"".join(dots)}</svg>')


def feature_link(feature: int, linked: set[int]) -> str:
    return f'<a href="feature_{feature}.html">{feature}</a>' if feature in linked else str(feature)


def token_table(pairs: list[tuple[str, float]]) -> str:
    rows = "".join(f"<tr><td>{esc(repr(token))}</td><td>{value:+.3f}</td></tr>"
                   for token, value in pairs)
    return f'<table class="lens">{rows}</table>'


def feature_page(feature: int, stats: dict, examples: list[Example], bands: list[QuantileBand],
                 lens, neighbours: list[tuple[int, float]], map_html: str, hist_html: str,
                 linked: set[int]) -> str:
    scale = stats["max"]
    top = "".join(example_html(e, scale) for e in examples) or "<p>No activations.</p>"
    quantiles = "".join(
        f"<h3>Interval {band.low:.3g} – {band.high:.3g}</h3>"
        + "".join(example_html(e, scale) for e in band.examples) for band in reversed(bands))
    near = "".join(f"<tr><td>{feature_link(n, linked)}</td><td>{cos:.3f}</td></tr>"
                   for n, cos in neighbours)
    lens_html = ("<p>No model given: no logit lens.</p>" if lens is None else
                 f'<div class="cols"><div><h3>Promoted</h3>{token_table(lens[0])}</div>'
                 f"<div><h3>Suppressed</h3>{token_table(lens[1])}</div></div>")
    body = f"""<p><a href="index.html">index</a></p>
<h1>Feature {feature}</h1>
<p>Density {100 * stats['frequency']:.4f}% of {stats['n_tokens']:,} tokens
(log10 {math.log10(stats['frequency'] + 1e-10):.2f}) · max activation {stats['max']:.3f}
· mean activation {stats['mean']:.4g}</p>
<div class="cols"><div><h2>Activation histogram</h2>{hist_html}</div>
<div><h2>Logit lens</h2>{lens_html}</div></div>
<div class="cols"><div><h2>Nearest features (decoder cosine)</h2><table>{near}</table></div>
<div><h2>Feature map (PCA of neighbours' decoder rows)</h2>{map_html}</div></div>
<h2>Top activations</h2>{top}
<h2>Quantile examples</h2>{quantiles or "<p>No activations.</p>"}"""
    return page(f"Feature {feature}", body)


def index_page(rows: list[dict], title: str) -> str:
    body_rows = "".join(
        f'<tr data-i="{i}"><td><a href="feature_{r["id"]}.html">{r["id"]}</a></td>'
        f'<td class="num">{100 * r["frequency"]:.4f}%</td><td class="num">{r["max"]:.3f}</td>'
        f'<td class="num">{r["mean"]:.4g}</td><td>{esc(repr(r["top_token"]))}</td>'
        f'<td class="ex">{esc(shown_token(r["snippet"]))}</td></tr>' for i, r in enumerate(rows))
    body = f"""<h1>{esc(title)}</h1>
<input id="filter" type="search" placeholder="filter: feature id, token or text">
<span id="count"></span>
<table id="features"><thead><tr><th data-key="id">Feature</th><th data-key="frequency">Density</th>
<th data-key="max">Max act</th><th data-key="mean">Mean act</th><th>Top logit token</th>
<th>Top example</th></tr></thead><tbody>{body_rows}</tbody></table>"""
    data = [{"id": r["id"], "frequency": r["frequency"], "max": r["max"], "mean": r["mean"],
             "search": f'{r["top_token"]} {r["snippet"]}'.lower()} for r in rows]
    script = (f'<script type="application/json" id="feature-data">{json_for_script(data)}'
              f"</script>\n<script>{INDEX_JS}</script>\n")
    return page(title, body, script)


def write_dashboard(out_dir: str | Path, model, sae, cache, features, n_examples: int = 20,
                    window: tuple[int, int] = (12, 4), n_bands: int = 10, per_band: int = 3,
                    n_samples: int = 400, n_neighbours: int = 10, map_neighbours: int = 30,
                    k_logits: int = 10, max_rows: int | None = None, seed: int = 0) -> Path:
    """Write ``index.html`` and ``feature_<id>.html`` for ``features`` into ``out_dir``.

    ``cache``: an activation cache (or its folder) at the SAE's hook, or an
    ``analyse.ModelSource``; ``model`` gives the tokenizer and the logit lens (None: the
    cache's model's tokenizer, no logit lens). One streaming pass over the first
    ``max_rows`` rows (None: all) collects examples and statistics. Returns ``out_dir``.
    """
    counts = {"--n-examples": (n_examples, 1), "--max-rows": (max_rows, 1), "n_bands": (n_bands, 1),
              "per_band": (per_band, 0), "n_samples": (n_samples, 0),
              "n_neighbours": (n_neighbours, 0), "map_neighbours": (map_neighbours, 0),
              "k_logits": (k_logits, 0)}
    for name, (value, least) in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < least):
            raise analyse.AnalysisInputError(f"{name} must be a whole number >= {least}, got "
                                             f"{value!r}.")
    out = Path(out_dir)
    source = analyse.open_source(cache)
    ids = analyse.check_features(sae, features)
    out.mkdir(parents=True, exist_ok=True)
    scan = analyse.scan_features(sae, source, ids, n_examples, n_samples, window, seed, max_rows)
    tokenizer = analyse._tokenizer(source, model.tokenizer if model is not None else None)
    examples = analyse.examples_from_scan(scan, tokenizer)
    bands = analyse.bands_from_scan(scan, tokenizer, n_bands, per_band)
    stats = scan.statistics()
    lenses = directions.logit_lens_batch(model, sae, ids, k_logits) if model is not None else None
    linked = set(ids.tolist())
    rows = []
    for j, feature in enumerate(ids.tolist()):
        info = {"id": feature, "frequency": float(stats.frequency[j]), "n_tokens": stats.n_tokens,
                "max": float(stats.max_activation[j]), "mean": float(stats.mean_activation[j])}
        lens = lenses[j] if lenses is not None else None
        map_ids, coords = directions.feature_map(sae, feature, map_neighbours)
        html_text = feature_page(
            feature, info, examples[feature], bands[feature], lens,
            directions.nearest_features(sae, feature, n_neighbours),
            map_svg(map_ids, coords, linked),
            histogram_svg(stats.histogram[j], stats.bin_edges), linked)
        (out / f"feature_{feature}.html").write_text(html_text, encoding="utf-8")
        top = examples[feature][0] if examples[feature] else None
        rows.append({**info, "top_token": lens[0][0][0] if lens else "",
                     "snippet": "".join(top.tokens) if top else ""})
    hook = sae.cfg.metadata.hook_name or "?"
    (out / "index.html").write_text(index_page(rows, f"SAE features at {hook}"), encoding="utf-8")
    return out


# --- command line ------------------------------------------------------------------------------

def parse_features(spec: str, d_sae: int) -> list[int]:
    """``"0:200,512,7"`` → ids (ranges end-exclusive; ``"all"``: every feature)."""
    if spec.strip() == "all":
        return list(range(d_sae))
    ids: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if ":" in part:
                start, end = part.split(":")
                ids += range(int(start or 0), int(end) if end else d_sae)
            else:
                ids.append(int(part))
    except ValueError as err:
        raise FeatureIndexError(f"--features takes ids and ranges like 0:200,512, got {spec!r}.") from err
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad or not ids:
        raise FeatureIndexError(f"--features {spec!r} names feature {bad[0] if bad else 'none'}, "
                                f"but the SAE has d_sae = {d_sae} features (0 to {d_sae - 1}).")
    return list(dict.fromkeys(ids))
