"""The HTML of ``saekit serve``: features list, feature page, search by text, steering.

Plain server-rendered HTML with one local stylesheet and one local script (``STATIC``); nothing
is fetched from elsewhere. Every string from the corpus, the tokenizer, an explanations file or
a request goes through ``dashboard.esc`` on the server; data for the script sits in ``<script
type="application/json">`` blocks (``dashboard.json_for_script``) and the script only ever
writes it with ``textContent``. Feature pages reuse the static dashboard's content
(``dashboard.feature_body``).
"""

from __future__ import annotations

import math
from urllib.parse import urlencode

import torch

from saekit import analyse
from saekit.dashboard import (CSS, esc, explanation_html, feature_body, histogram_svg,
                              json_for_script, map_svg, number, shown_token)
from saekit.serve import examples_of
from saekit.serve_requests import FeatureQuery, Limits

FEATURE_LINK = "/feature/{}"

SERVE_CSS = """
nav { margin-bottom: 1em; padding-bottom: 0.4em; border-bottom: 1px solid #ccc; }
nav a { margin-right: 1.2em; font-weight: 600; }
form.bar { display: flex; gap: 0.6em; flex-wrap: wrap; align-items: end; margin: 0.5em 0; }
form.bar label { font-size: 13px; color: #555; display: flex; flex-direction: column; }
input, select, textarea, button { font: inherit; padding: 3px 5px; }
textarea { width: 100%; box-sizing: border-box; }
.error { color: #a00; background: #fee; padding: 6px 10px; border: 1px solid #e99; }
.pages a, .pages span { margin-right: 1em; }
.tokens .tok { cursor: pointer; border-bottom: 1px dotted #999; }
.tokens .tok.on { outline: 2px solid #36c; }
.out { font-family: ui-monospace, monospace; white-space: pre-wrap; background: #fafafa;
       border: 1px solid #ddd; padding: 8px; min-height: 4em; }
.out .prompt { color: #888; }
.edit-row { display: flex; gap: 0.5em; margin: 3px 0; }
#status { color: #555; margin-left: 1em; }
"""

SERVE_JS = r"""
(function () {
  function data(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }
  function link(feature) {
    var a = document.createElement("a");
    a.href = "/feature/" + feature; a.textContent = String(feature);
    return a;
  }
  // --- search: click a token for its features, a row's "show" to colour the tokens ---
  var search = data("search-data");
  if (search) {
    var spans = document.querySelectorAll(".tokens .tok"), panel = document.getElementById("token-panel");
    function pick(i) {
      spans.forEach(function (s) { s.classList.toggle("on", s.getAttribute("data-i") === String(i)); });
      panel.textContent = "";
      var head = document.createElement("h3");
      head.textContent = "Token " + i + ": " + JSON.stringify(search.tokens[i]);
      panel.appendChild(head);
      var list = document.createElement("ul");
      search.firing[i].forEach(function (pair) {
        var li = document.createElement("li");
        li.appendChild(link(pair[0]));
        li.appendChild(document.createTextNode(" " + pair[1].toFixed(3)));
        list.appendChild(li);
      });
      if (!search.firing[i].length) list.textContent = "No feature fires here.";
      panel.appendChild(list);
    }
    spans.forEach(function (s) {
      s.addEventListener("click", function () { pick(s.getAttribute("data-i")); });
    });
    document.querySelectorAll("button.show").forEach(function (b) {
      b.addEventListener("click", function () {
        var hit = search.top[b.getAttribute("data-j")], top = Math.max.apply(null, hit.activations) || 1;
        spans.forEach(function (s, i) {
          s.style.backgroundColor = "rgba(255, 120, 0, " + Math.min(hit.activations[i] / top, 1).toFixed(2) + ")";
          s.title = hit.feature + ": " + hit.activations[i].toFixed(3);
        });
      });
    });
  }
  // --- steer: edits, then the two continuations streamed side by side ---
  var form = document.getElementById("steer-form");
  if (form) {
    var rows = document.getElementById("edits"), template = rows.querySelector(".edit-row");
    document.getElementById("add-edit").addEventListener("click", function () {
      var row = template.cloneNode(true);
      row.querySelectorAll("input").forEach(function (i) { i.value = ""; });
      rows.appendChild(row);
    });
    var status = document.getElementById("status");
    function show(side, text) {
      var out = document.getElementById(side);
      out.textContent = "";
      var p = document.createElement("span");
      p.className = "prompt"; p.textContent = form.prompt.value;
      out.appendChild(p); out.appendChild(document.createTextNode(text));
    }
    function handle(event) {
      if (event.type === "queued") status.textContent = event.position + " request(s) ahead of yours";
      else if (event.type === "token") { status.textContent = "generating " + event.side; show(event.side, event.text); }
      else if (event.type === "done") {
        show("unsteered", event.unsteered); show("steered", event.steered);
        status.textContent = "done";
        document.body.setAttribute("data-steered", "1");
      } else if (event.type === "error") {
        status.textContent = ""; document.getElementById("error").textContent = event.error;
        document.getElementById("error").hidden = false;
      }
    }
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      document.body.removeAttribute("data-steered");
      document.getElementById("error").hidden = true;
      var edits = [];
      rows.querySelectorAll(".edit-row").forEach(function (row) {
        var f = row.querySelector("[name=feature]").value.trim();
        if (f !== "") edits.push({feature: f, mode: row.querySelector("[name=mode]").value,
                                  value: row.querySelector("[name=value]").value || 0});
      });
      var body = {prompt: form.prompt.value, edits: edits, max_new_tokens: form.max_new_tokens.value,
                  temperature: form.temperature.value, seed: form.seed.value, stream: true};
      show("unsteered", ""); show("steered", ""); status.textContent = "sending";
      fetch("/api/steer", {method: "POST", headers: {"Content-Type": "application/json"},
                           body: JSON.stringify(body)}).then(function (response) {
        if (!response.ok) return response.json().then(function (j) { handle({type: "error", error: j.error}); });
        var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "";
        function read() {
          return reader.read().then(function (chunk) {
            if (chunk.done) return;
            buffer += decoder.decode(chunk.value, {stream: true});
            var parts = buffer.split("\n\n"); buffer = parts.pop();
            parts.forEach(function (part) {
              if (part.indexOf("data: ") === 0) handle(JSON.parse(part.slice(6)));
            });
            return read();
          });
        }
        return read();
      }).catch(function (err) { handle({type: "error", error: String(err)}); });
    });
  }
  // --- sweep: one feature's steering curve, plotted ---
  var sweep = document.getElementById("sweep-form");
  if (sweep) {
    var SVG = "http://www.w3.org/2000/svg";
    function el(name, attrs, parent) {
      var node = document.createElementNS(SVG, name);
      Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
      parent.appendChild(node);
      return node;
    }
    function chart(points) {  // mention rate (0-1, orange) and log perplexity (blue)
      var box = document.getElementById("sweep-chart"), w = 560, h = 220;
      box.textContent = "";
      var svg = el("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h}, box);
      var ppl = points.map(function (p) { return Math.log10(p.perplexity || 1); });
      var top = Math.max.apply(null, ppl.concat([1]));
      function x(i) { return 50 + i * (w - 100) / Math.max(points.length - 1, 1); }
      [["mention", function (p) { return p.mention_rate; }, "#e07020", 1],
       ["ppl", function (p, i) { return ppl[i]; }, "#3366cc", top]].forEach(function (s) {
        el("polyline", {fill: "none", stroke: s[2], "stroke-width": 2, points: points.map(function (p, i) {
          return x(i) + "," + (h - 30 - (h - 50) * s[1](p, i) / s[3]);
        }).join(" ")}, svg);
      });
      points.forEach(function (p, i) {
        el("text", {x: x(i), y: h - 10, "font-size": 11, "text-anchor": "middle"}, svg).textContent = p.label;
      });
      el("text", {x: 5, y: 14, "font-size": 11, fill: "#e07020"}, svg).textContent = "mention rate (0-1)";
      el("text", {x: w - 5, y: 14, "font-size": 11, fill: "#3366cc", "text-anchor": "end"}, svg)
        .textContent = "log10 perplexity (top " + top.toFixed(1) + ")";
    }
    sweep.addEventListener("submit", function (e) {
      e.preventDefault();
      var main = document.getElementById("steer-form"), msg = document.getElementById("sweep-status");
      document.body.removeAttribute("data-swept");
      msg.textContent = "running (this takes a while)";
      var body = {prompt: main.prompt.value, feature: sweep.feature.value, concept: sweep.concept.value,
                  values: sweep.values.value.split(",").filter(function (v) { return v.trim() !== ""; }),
                  samples: sweep.samples.value, max_new_tokens: main.max_new_tokens.value,
                  temperature: main.temperature.value, seed: main.seed.value};
      fetch("/api/sweep", {method: "POST", headers: {"Content-Type": "application/json"},
                           body: JSON.stringify(body)}).then(function (r) { return r.json(); }).then(function (j) {
        if (j.error) { msg.textContent = j.error; return; }
        var points = (j.baseline ? [Object.assign({label: "unsteered"}, j.baseline)] : [])
          .concat(j.curve.map(function (p) { return Object.assign({label: String(p.value)}, p); }));
        chart(points);
        var table = document.getElementById("sweep-table");
        table.textContent = "";
        points.forEach(function (p) {
          var row = table.insertRow();
          [p.label, (100 * p.mention_rate).toFixed(0) + "%", p.perplexity === null ? "-" : p.perplexity.toFixed(1),
           p.kl_neutral === null ? "-" : p.kl_neutral.toFixed(3), p.samples.length ? p.samples[0].text : ""]
            .forEach(function (v) { row.insertCell().textContent = v; });
        });
        msg.textContent = "done";
        document.body.setAttribute("data-swept", "1");
      }).catch(function (err) { msg.textContent = String(err); });
    });
  }
  document.body.setAttribute("data-ready", "1");
})();
"""

STATIC = {"serve.css": ("text/css", CSS + SERVE_CSS),
          "serve.js": ("text/javascript", SERVE_JS)}


def layout(title: str, body: str, data: dict | None = None) -> str:
    """A whole page: the navigation, ``body``, and ``data`` for the script (JSON, by id)."""
    blocks = "".join(f'<script type="application/json" id="{esc(name)}">{json_for_script(value)}'
                     f"</script>\n" for name, value in (data or {}).items())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}'
            f'</title><link rel="stylesheet" href="/static/serve.css"></head>\n<body>\n<nav>'
            f'<a href="/features">Features</a><a href="/search">Search</a>'
            f'<a href="/steer">Steer</a></nav>\n{body}\n{blocks}'
            f'<script src="/static/serve.js"></script></body></html>\n')


def error_page(message: str) -> str:
    return layout("Error", f'<h1>Error</h1><p class="error" id="error">{esc(message)}</p>')


def percent(fraction: float) -> str:
    return f"{100 * fraction:.4f}%"


def features_page(rows: list[dict], total: int, query: FeatureQuery, n_features: int,
                  explained: bool, title: str) -> str:
    """The features list: a filter form, one page of rows, links to the other pages."""
    def field(name: str, label: str, value: object, size: int = 8) -> str:
        shown = "" if value is None else value
        return (f'<label>{esc(label)}<input name="{name}" id="{name}" size="{size}" '
                f'value="{esc(shown)}"></label>')

    sort = ("-" if query.descending else "") + query.sort
    options = "".join(f'<option value="{v}"{" selected" if v == sort else ""}>{esc(label)}</option>'
                      for v, label in (("id", "id"), ("-density", "density, highest"),
                                       ("density", "density, lowest"), ("-max", "max act"),
                                       ("-mean", "mean act"), ("-score", "score")))
    form = (f'<form class="bar" method="get" action="/features">'
            f'{field("q", "feature id or explanation words", query.text, 28)}'
            f'{field("min_density", "min density (0-1)", query.min_density)}'
            f'{field("max_density", "max density (0-1)", query.max_density)}'
            + (field("min_score", "min score", query.min_score) if explained else "")
            + f'<label>sort<select name="sort" id="sort">{options}</select></label>'
            f'<input type="hidden" name="per_page" value="{query.per_page}">'
            f'<button type="submit" id="apply">Apply</button></form>')
    heads = "<th>Feature</th><th>Density</th><th>Max act</th><th>Mean act</th>" + \
        ("<th>Explanation</th><th>Score</th>" if explained else "")
    body_rows = "".join(
        f'<tr><td><a href="{FEATURE_LINK.format(r["id"])}">{r["id"]}</a></td>'
        f'<td class="num">{percent(r["density"])}</td><td class="num">{r["max"]:.3f}</td>'
        f'<td class="num">{r["mean"]:.4g}</td>'
        + (f'<td>{esc(r["explanation"] or "")}</td><td class="num">{number(r["score"])}</td>'
           if explained else "") + "</tr>" for r in rows)
    pages = max(1, math.ceil(total / query.per_page))

    def page_link(n: int, label: str) -> str:
        params = {"q": query.text, "sort": sort, "page": n, "per_page": query.per_page,
                  **{k: v for k in ("min_density", "max_density", "min_score")
                     if (v := getattr(query, k)) is not None}}
        return f'<a href="/features?{esc(urlencode(params))}">{label}</a>'

    nav = (f'<p class="pages">{page_link(query.page - 1, "&larr; previous") if query.page > 1 else ""}'
           f'<span id="count">{total:,} of {n_features:,} features · page {query.page} of '
           f'{pages}</span>{page_link(query.page + 1, "next &rarr;") if query.page < pages else ""}'
           "</p>")
    body = (f"<h1>{esc(title)}</h1>{form}{nav}<table id=\"features\"><thead><tr>{heads}</tr>"
            f"</thead><tbody>{body_rows}</tbody></table>{nav}")
    return layout(title, body)


def feature_page(data: dict, explanation, seconds: float) -> str:
    """One feature's page: the static dashboard's content with server links, and a link to
    steer with it (clamped at twice its max activation)."""
    feature = data["feature"]
    examples, bands = examples_of(data)
    stats = {k: data[k] for k in ("frequency", "n_tokens", "max", "mean")}
    lens = (data["lens"]["promoted"], data["lens"]["suppressed"])
    everything = range(10**12)  # every feature has a page
    map_html = map_svg(torch.tensor(data["map"]["ids"]), torch.tensor(data["map"]["coords"]),
                       everything, link=FEATURE_LINK)
    hist = histogram_svg(torch.tensor(data["histogram"]), analyse.HIST_EDGES)
    explained = "" if explanation is False else explanation_html(explanation)
    value = round(2 * data["max"], 2) or 1.0
    params = {"feature": feature, "value": value, "concept": top_word(examples)}
    steer = (f'<p><a id="steer-link" href="/steer?{esc(urlencode(params))}">'
             f"Steer with feature {feature}</a> (clamped at {value:g}, twice its max) · "
             f'<span class="meta" id="timing">{seconds * 1000:.0f} ms</span></p>')
    body = feature_body(feature, stats, examples, bands, [list(map(tuple, p)) for p in lens],
                        [tuple(n) for n in data["neighbours"]], map_html, hist, everything,
                        explained, link=FEATURE_LINK)
    return layout(f"Feature {feature}", steer + body)


def top_word(examples: list) -> str:
    """The word the feature fires on most (``fish*``), to measure steering by; "" if none."""
    if not examples:
        return ""
    top = examples[0]
    word = top.tokens[top.position - top.start].strip().lower()
    return f"{word}*" if word.isalpha() else ""


def search_page(text: str, result: dict | None, query: str, matches: list | None,
                explained: bool) -> str:
    """Search by text (tokens, features per token, top features) and by explanation."""
    form = ('<form method="get" action="/search"><label>Text<textarea name="text" id="text" '
            f'rows="3">{esc(text)}</textarea></label><button type="submit" id="go">Find '
            "features</button></form>")
    if explained:
        form += ('<form class="bar" method="get" action="/search"><label>Explanation words'
                 f'<input name="q" id="q" size="30" value="{esc(query)}"></label>'
                 '<button type="submit" id="go-q">Search explanations</button></form>')
    parts = [f"<h1>Search</h1>{form}"]
    data = {}
    if result is not None:
        tokens = "".join(f'<span class="tok" data-i="{i}">{esc(shown_token(t))}</span>'
                         for i, t in enumerate(result["tokens"]))
        rows = "".join(
            f'<tr><td><a class="hit" href="{FEATURE_LINK.format(h["feature"])}">{h["feature"]}</a>'
            f'</td><td class="num">{h["score"]:.3f}</td><td class="num">{h["mean"]:.3f}</td>'
            f'<td class="num">{h["max"]:.3f}</td><td>{esc(h["explanation"] or "")}</td>'
            f'<td><button type="button" class="show" data-j="{j}">show on tokens</button></td></tr>'
            for j, h in enumerate(result["top"]))
        parts.append(f'<h2>Tokens (click one for its features)</h2><div class="ex tokens">{tokens}'
                     '</div><div id="token-panel"></div><h2>Features most specific to the text'
                     '</h2><table id="top"><tr><th>Feature</th><th>Score</th><th>Mean act</th>'
                     f'<th>Max act</th><th>Explanation</th><th></th></tr>{rows}</table>')
        data["search-data"] = result
    if matches is not None:
        rows = "".join(f'<tr><td><a href="{FEATURE_LINK.format(m.feature)}">{m.feature}</a></td>'
                       f'<td class="num">{number(m.score)}</td><td>{esc(m.explanation)}</td></tr>'
                       for m in matches)
        parts.append(f"<h2>Explanations matching {esc(repr(query))}: {len(matches)}</h2>"
                     f'<table id="matches"><tr><th>Feature</th><th>Score</th><th>Explanation</th>'
                     f"</tr>{rows}</table>")
    return layout("Search", "".join(parts), data)


def steer_page(edits: list[dict], limits: Limits, prompt: str = "I think that",
               concept: str = "") -> str:
    """The steering form (pre-filled ``edits``: feature, mode, value) and the two outputs."""
    rows = "".join(edit_row(e) for e in edits or [{}])
    body = f"""<h1>Steer</h1>
<form id="steer-form"><label>Prompt<textarea name="prompt" id="prompt" rows="2"
maxlength="{limits.max_prompt_chars}">{esc(prompt)}</textarea></label>
<div id="edits">{rows}</div><button type="button" id="add-edit">add a feature</button>
<div class="bar"><label>max new tokens <input name="max_new_tokens" type="number" min="1"
max="{limits.max_new_tokens}" value="{min(32, limits.max_new_tokens)}"></label>
<label>temperature <input name="temperature" type="number" min="0" max="5" step="0.1"
value="0.7"></label><label>seed <input name="seed" type="number" min="0" value="0"></label>
<button type="submit" id="run">Generate</button><span id="status"></span></div></form>
<p class="error" id="error" hidden></p>
<div class="cols"><div><h2>Unsteered</h2><div class="out" id="unsteered"></div></div>
<div><h2>Steered</h2><div class="out" id="steered"></div></div></div>
{sweep_form(edits[0] if edits else {}, concept)}"""
    return layout("Steer", body)


def sweep_form(edit: dict, concept: str) -> str:
    """The sweep: one feature clamped at several values (default: its pre-filled value x 0.5,
    1, 2, 4), measured on the prompt above by the concept words' mention rate and perplexity."""
    try:
        value = float(edit.get("value", ""))
        values = ",".join(f"{value * m:.3g}" for m in (0.5, 1, 2, 4)) if math.isfinite(value) else ""
    except ValueError:
        values = ""
    return f"""<h2>Sweep one feature (the steering curve)</h2>
<form id="sweep-form" class="bar"><label>feature <input name="feature" size="8"
value="{esc(edit.get("feature", ""))}"></label><label>clamp values <input name="values" size="18"
value="{esc(values)}"></label><label>concept words <input name="concept" size="16"
value="{esc(concept)}" placeholder="fish*,salmon"></label><label>samples per value <input
name="samples" type="number" min="1" max="8" value="4"></label>
<button type="submit" id="run-sweep">Run sweep</button><span id="sweep-status"></span></form>
<p class="meta">Uses the prompt, max new tokens, temperature and seed above; mention rate of the
concept words and perplexity under the unsteered model, per value (saekit steer-eval).</p>
<div id="sweep-chart"></div><table id="sweep-table"></table>"""


def edit_row(edit: dict) -> str:
    mode = edit.get("mode", "clamp")
    options = "".join(f'<option{" selected" if m == mode else ""}>{m}</option>'
                      for m in ("clamp", "add", "ablate"))
    return (f'<div class="edit-row"><input name="feature" placeholder="feature id" size="8" '
            f'value="{esc(edit.get("feature", ""))}"><select name="mode">{options}</select>'
            f'<input name="value" placeholder="value" size="8" value="{esc(edit.get("value", ""))}">'
            "</div>")
