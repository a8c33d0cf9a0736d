"""Static HTML feature dashboards: ``index.html`` and one ``feature_<id>.html`` per feature.

Pages are self-contained (inline CSS, inline SVG, a few lines of plain inline JS on the
index; no CDN) and open offline. Every string from the corpus, the tokenizer or an
explanations file (``saekit explain``'s, given as ``explanations``) goes through
``html.escape``; data for JS sits in a ``<script type="application/json">`` block with ``<``,
``>`` and ``&`` written as ``\\u003c`` etc., and is only ever read as text.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit import analyse, directions
from saekit.analyse import Example, FeatureIndexError, QuantileBand
from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.errors import ConfigError
from saekit.formats import SAE_HELP
from saekit.search import FeatureExplanation, balanced_accuracy, by_feature, load_explanations

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
#min-score { width: 7em; padding: 4px; }
.explanation { font-size: 1.15em; background: #f3f3fb; padding: 6px 10px; margin-bottom: 0; }
table.scores { width: auto; }
.scores th { cursor: default; }
.scores th + th { text-align: right; }
"""

INDEX_JS = """
(function () {
  var data = JSON.parse(document.getElementById("feature-data").textContent);
  var body = document.querySelector("#features tbody");
  var rows = Array.prototype.slice.call(body.rows);
  var box = document.getElementById("filter"), least = document.getElementById("min-score");
  var heads = document.querySelectorAll("#features th[data-key]");
  function get(row, key) {
    var value = data[row.getAttribute("data-i")][key];
    return typeof value === "number" ? value : null;
  }
  function apply() {
    var q = box.value.toLowerCase().trim(), min = least ? parseFloat(least.value) : NaN;
    var shown = 0;
    rows.forEach(function (row) {
      var d = data[row.getAttribute("data-i")], score = get(row, "score");
      var hit = (!q || d.search.indexOf(q) >= 0 || String(d.id) === q.replace("#", "")) &&
        (isNaN(min) || (score !== null && score >= min));
      row.hidden = !hit;
      if (hit) shown += 1;
    });
    document.getElementById("count").textContent = shown + " of " + rows.length + " features";
  }
  function sortBy(key, sign) {  // features without a value last, either way
    rows.sort(function (a, b) {
      var x = get(a, key), y = get(b, key), by_id = get(a, "id") - get(b, "id");
      if (x === null || y === null) return (x === null) - (y === null) || by_id;
      return sign * (x - y) || by_id;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  heads.forEach(function (th) {
    th.addEventListener("click", function () {
      sortBy(th.getAttribute("data-key"), th.classList.toggle("asc") ? 1 : -1);
    });
  });
  box.addEventListener("input", apply);
  if (least) least.addEventListener("input", apply);
  var params = {};  // #q=TEXT&min=0.7&sort=-score (a leading - sorts descending)
  location.hash.slice(1).split("&").forEach(function (part) {
    var i = part.indexOf("=");
    try { if (i > 0) params[part.slice(0, i)] = decodeURIComponent(part.slice(i + 1)); }
    catch (err) { /* a malformed escape: ignored */ }
  });
  if (params.q) box.value = params.q;
  if (params.min && least) least.value = params.min;
  heads.forEach(function (th) {
    var key = th.getAttribute("data-key"), sort = params.sort || "";
    if (sort.replace(/^-/, "") === key) sortBy(key, sort.charAt(0) === "-" ? -1 : 1);
  });
  apply();
  document.body.setAttribute("data-ready", "1");
})();
"""


@dataclass
class SAEAndCorpus:
    """The fields of a command that reads an SAE and a corpus at its hook: a cache
    (``activations``) or ``tokens`` of a ``dataset`` captured first (exactly one of them)."""

    sae: str = setting("", SAE_HELP, required=True)
    activations: str | None = setting(None, "activation cache at the SAE's hook (or --dataset)")
    dataset: str | None = setting(None, "corpus to capture first (kept in the output's cache "
                                  "folder): 'default', a local file or a dataset name (or "
                                  "--activations)")
    tokens: int = setting(200_000, "tokens to capture with --dataset", ge=1)


@dataclass
class DashboardConfig(SAEAndCorpus):
    """What ``saekit dashboard`` writes (its flags are these fields)."""

    features: str = setting("0:100", "feature ids and ranges, e.g. 0:200,512 ('all': every one)")
    out: str = setting("", "folder for index.html and the feature pages", required=True)
    n_examples: int = setting(20, "top-activating examples per feature", ge=1)
    max_rows: int | None = setting(None, "scan only the first rows of the cache", ge=1)
    explanations: str | None = setting(None, "explanations.jsonl of `saekit explain` (or its "
                                       "folder): show each feature's explanation and scores")
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


FEATURE_LINK = "feature_{}.html"  # a feature page's address, from another feature's page


def map_svg(ids: torch.Tensor, coords: torch.Tensor, linked: set[int], size: int = 300,
            link: str = FEATURE_LINK) -> str:
    """Feature (red) and neighbours placed by PCA of decoder rows; dots link to pages
    (``link`` formatted with the feature id)."""
    span = (coords.max(0).values - coords.min(0).values).clamp_min(1e-6)
    xy = (coords - coords.min(0).values) / span * (size - 20) + 10
    dots = []
    for n, (feature, (x, y)) in enumerate(zip(ids.tolist(), xy.tolist())):
        circle = (f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="{6 if n == 0 else 4}" '
                  f'fill="{"#c00" if n == 0 else "#38c"}"><title>feature {feature}</title></circle>')
        dots.append(f'<a href="{link.format(feature)}">{circle}</a>' if feature in linked and n
                    else circle)
    return (f'<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
            f'xmlns="http://www.w3.org/2000/svg" style="border:1px solid #ddd">'
            f'{"".join(dots)}</svg>')


def feature_link(feature: int, linked: set[int], link: str = FEATURE_LINK) -> str:
    return f'<a href="{link.format(feature)}">{feature}</a>' if feature in linked else str(feature)


def token_table(pairs: list[tuple[str, float]]) -> str:
    rows = "".join(f"<tr><td>{esc(repr(token))}</td><td>{value:+.3f}</td></tr>"
                   for token, value in pairs)
    return f'<table class="lens">{rows}</table>'


def number(value: object) -> str:
    """A score's value for a table cell: a float to 3 places, anything else escaped."""
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else esc(value)
    return "\u2013" if value is None else esc(value)


def explanation_html(record: FeatureExplanation | None) -> str:
    """The feature page's explanation section: the text, who wrote it, and every score."""
    if record is None:
        return "<h2>Explanation</h2><p>No explanation of this feature in the file given.</p>"
    names = list(dict.fromkeys(k for summary in record.scores.values() for k in summary))
    head = "".join(f"<th>{esc(name)}</th>" for name in names)
    rows = "".join(f"<tr><td>{esc(scorer)}</td>"
                   + "".join(f'<td class="num">{number(summary.get(k))}</td>' for k in names)
                   + "</tr>" for scorer, summary in record.scores.items())
    scores = (f'<table class="scores"><tr><th>Scorer</th>{head}</tr>{rows}</table>' if rows
              else "<p>Not scored.</p>")
    source = f"by {record.explainer or '?'}, prompt {record.prompt_version or '?'}" + \
        (f", judged by {record.judge}" if record.judge else "")
    return (f'<h2>Explanation</h2><p class="explanation">{esc(record.explanation)}</p>'
            f'<p class="meta">{esc(source)}</p>{scores}')


def feature_page(feature: int, stats: dict, examples: list[Example], bands: list[QuantileBand],
                 lens, neighbours: list[tuple[int, float]], map_html: str, hist_html: str,
                 linked: set[int], explained: str = "") -> str:
    body = feature_body(feature, stats, examples, bands, lens, neighbours, map_html, hist_html,
                        linked, explained)
    return page(f"Feature {feature}", f'<p><a href="index.html">index</a></p>\n{body}')


def feature_body(feature: int, stats: dict, examples: list[Example], bands: list[QuantileBand],
                 lens, neighbours: list[tuple[int, float]], map_html: str, hist_html: str,
                 linked: set[int], explained: str = "", link: str = FEATURE_LINK) -> str:
    """A feature page's content (``saekit serve`` wraps it in its own page; ``link``: the
    address of another feature's page, formatted with its id)."""
    scale = stats["max"]
    top = "".join(example_html(e, scale) for e in examples) or "<p>No activations.</p>"
    quantiles = "".join(
        f"<h3>Interval {band.low:.3g} – {band.high:.3g}</h3>"
        + "".join(example_html(e, scale) for e in band.examples) for band in reversed(bands))
    near = "".join(f"<tr><td>{feature_link(n, linked, link)}</td><td>{cos:.3f}</td></tr>"
                   for n, cos in neighbours)
    lens_html = ("<p>No model given: no logit lens.</p>" if lens is None else
                 f'<div class="cols"><div><h3>Promoted</h3>{token_table(lens[0])}</div>'
                 f"<div><h3>Suppressed</h3>{token_table(lens[1])}</div></div>")
    return f"""<h1>Feature {feature}</h1>
<p>Density {100 * stats['frequency']:.4f}% of {stats['n_tokens']:,} tokens
(log10 {math.log10(stats['frequency'] + 1e-10):.2f}) · max activation {stats['max']:.3f}
· mean activation {stats['mean']:.4g}</p>
{explained}
<div class="cols"><div><h2>Activation histogram</h2>{hist_html}</div>
<div><h2>Logit lens</h2>{lens_html}</div></div>
<div class="cols"><div><h2>Nearest features (decoder cosine)</h2><table>{near}</table></div>
<div><h2>Feature map (PCA of neighbours' decoder rows)</h2>{map_html}</div></div>
<h2>Top activations</h2>{top}
<h2>Quantile examples</h2>{quantiles or "<p>No activations.</p>"}"""


def score_columns(scorers: list[str] | None) -> list[tuple[str, str]]:
    """(data key, heading) of the index's score columns: the mean balanced accuracy, and each
    scorer's when there are several (``scorers`` None: no explanations, no columns)."""
    if scorers is None:
        return []
    each = [(f"score_{j}", f"{name} bal. acc.") for j, name in enumerate(scorers)]
    return [("score", "Score")] + (each if len(scorers) > 1 else [])


def score_values(record: FeatureExplanation | None, scorers: list[str]) -> dict:
    """The index's sort keys of one feature's scores (None where it has none)."""
    if record is None:
        return {"score": None, **{f"score_{j}": None for j in range(len(scorers))}}
    return {"score": record.score, **{f"score_{j}": balanced_accuracy(record.scores.get(name))
                                      for j, name in enumerate(scorers)}}


def index_page(rows: list[dict], title: str, scorers: list[str] | None = None) -> str:
    """The index: one row per feature; with ``scorers`` (explanations given) its explanation
    and scores too, sortable and filterable by score."""
    columns = score_columns(scorers)
    values = [score_values(r.get("explained"), scorers or []) for r in rows]

    def explained(r: dict, v: dict) -> str:
        if scorers is None:
            return ""
        text = r["explained"].explanation if r.get("explained") else ""
        return f"<td>{esc(text)}</td>" + "".join(f'<td class="num">{number(v[key])}</td>'
                                                 for key, _ in columns)

    body_rows = "".join(
        f'<tr data-i="{i}"><td><a href="feature_{r["id"]}.html">{r["id"]}</a></td>{explained(r, v)}'
        f'<td class="num">{100 * r["frequency"]:.4f}%</td><td class="num">{r["max"]:.3f}</td>'
        f'<td class="num">{r["mean"]:.4g}</td><td>{esc(repr(r["top_token"]))}</td>'
        f'<td class="ex">{esc(shown_token(r["snippet"]))}</td></tr>'
        for i, (r, v) in enumerate(zip(rows, values)))
    heads = ("" if scorers is None else "<th>Explanation</th>" + "".join(
        f'<th data-key="{key}">{esc(name)}</th>' for key, name in columns))
    least = ("" if scorers is None else '<input id="min-score" type="number" min="0" max="1" '
             'step="0.05" placeholder="min score" title="minimum mean balanced accuracy">')
    body = f"""<h1>{esc(title)}</h1>
<input id="filter" type="search" placeholder="filter: feature id, token or text">
{least} <span id="count"></span>
<table id="features"><thead><tr><th data-key="id">Feature</th>{heads}
<th data-key="frequency">Density</th><th data-key="max">Max act</th>
<th data-key="mean">Mean act</th><th>Top logit token</th><th>Top example</th></tr></thead><tbody>{body_rows}</tbody></table>"""
    data = [{"id": r["id"], "frequency": r["frequency"], "max": r["max"], "mean": r["mean"], **v,
             "search": " ".join([r["top_token"], r["snippet"], r["explained"].explanation
                                 if r.get("explained") else ""]).lower()}
            for r, v in zip(rows, values)]
    script = (f'<script type="application/json" id="feature-data">{json_for_script(data)}'
              f"</script>\n<script>{INDEX_JS}</script>\n")
    return page(title, body, script)


def write_dashboard(out_dir: str | Path, model, sae, cache, features, n_examples: int = 20,
                    window: tuple[int, int] = (12, 4), n_bands: int = 10, per_band: int = 3,
                    n_samples: int = 400, n_neighbours: int = 10, map_neighbours: int = 30,
                    k_logits: int = 10, max_rows: int | None = None, seed: int = 0,
                    explanations: str | Path | Mapping[int, FeatureExplanation] | None = None
                    ) -> Path:
    """Write ``index.html`` and ``feature_<id>.html`` for ``features`` into ``out_dir``.

    ``cache``: an activation cache (or its folder) at the SAE's hook, or an
    ``analyse.ModelSource``; ``model`` gives the tokenizer and the logit lens (None: the
    cache's model's tokenizer, no logit lens). One streaming pass over the first
    ``max_rows`` rows (None: all) collects examples and statistics. ``explanations``
    (an explanations file or folder, or feature → record as ``saekit.search.by_feature``
    gives): each feature's explanation and scores on its page and in the index. Returns
    ``out_dir``.
    """
    if isinstance(explanations, (str, Path)):
        explanations = by_feature(load_explanations(explanations))
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
    tokenizer = analyse.source_tokenizer(source, model.tokenizer if model is not None else None)
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
            histogram_svg(stats.histogram[j], stats.bin_edges), linked,
            "" if explanations is None else explanation_html(explanations.get(feature)))
        (out / f"feature_{feature}.html").write_text(html_text, encoding="utf-8")
        top = examples[feature][0] if examples[feature] else None
        rows.append({**info, "top_token": lens[0][0][0] if lens else "",
                     "snippet": "".join(top.tokens) if top else "",
                     "explained": explanations.get(feature) if explanations is not None else None})
    hook = sae.cfg.metadata.hook_name or "?"
    scorers = None if explanations is None else list(dict.fromkeys(
        name for r in rows if r["explained"] for name in r["explained"].scores))
    (out / "index.html").write_text(index_page(rows, f"SAE features at {hook}", scorers),
                                    encoding="utf-8")
    return out


# --- command line ------------------------------------------------------------------------------

def parse_features(spec: str, d_sae: int) -> list[int]:
    """``"0:200,512,7"`` → ids (ranges end-exclusive, open ends as in Python: ``"5:"`` is 5
    to the last feature; ``"all"``: every feature)."""
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
