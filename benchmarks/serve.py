"""Latency of ``saekit serve`` measured over HTTP: start-up (model, SAE, the scan of every
feature), the features list, a feature page cold and cached, search by text, and steering.

    .venv/bin/python benchmarks/serve.py --activations runs/acts6 --max-rows 400

Prints one JSON object (seconds); the first start-up on a cache scans it, later ones read the
scan from ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import httpx

from saekit.serve import ServeConfig
from saekit.serve_app import build_explorer, start_in_thread

SHIPPED_SAE = "saekit/data/sae/gemma-3-270m-blocks.6-topk-16k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae", default=SHIPPED_SAE)
    parser.add_argument("--activations", required=True)
    parser.add_argument("--max-rows", type=int, default=400)
    parser.add_argument("--cache-dir", default=None, help="default: a new temporary folder")
    parser.add_argument("--features", default="7463,11293", help="two features to open")
    args = parser.parse_args()
    started = time.perf_counter()
    config = ServeConfig(sae=args.sae, activations=args.activations, max_rows=args.max_rows,
                         cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="saekit-serve-"),
                         port=0)
    explorer = build_explorer(config)
    out = {"max_rows": args.max_rows, "tokens": explorer.statistics.n_tokens,
           "startup_s": time.perf_counter() - started}
    server, url = start_in_thread(explorer)

    def timed(method: str, path: str, **kwargs) -> tuple[float, httpx.Response]:
        began = time.perf_counter()
        response = getattr(httpx, method)(url + path, timeout=900, **kwargs)
        response.raise_for_status()
        return time.perf_counter() - began, response

    out["features_page_s"] = min(timed("get", "/features?sort=-density")[0] for _ in range(3))
    out["features_filter_s"] = min(timed("get", "/features?q=1234&min_density=0.001")[0]
                                   for _ in range(3))
    for feature in args.features.split(","):
        out[f"feature_{feature}_cold_s"] = timed("get", f"/feature/{feature}")[0]
        out[f"feature_{feature}_cached_s"] = min(timed("get", f"/feature/{feature}")[0]
                                                 for _ in range(3))
    out["search_s"] = timed("get", "/search", params={
        "text": "The smoked fish was served with rice and cheese."})[0]
    body = {"prompt": "I think that", "max_new_tokens": 32, "temperature": 0.7, "seed": 0,
            "edits": [{"feature": int(args.features.split(",")[0]), "mode": "clamp",
                       "value": 4.0}]}
    out["steer_32_both_s"] = timed("post", "/api/steer", json=body)[0]
    body["edits"] = []
    out["generate_32_unsteered_only_s"] = timed("post", "/api/steer", json=body)[0]
    server.should_exit = True
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
