"""Feature analysis: the streaming pass against brute force; directions: logit lens,
neighbours, search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from saekit import ActivationCache
from saekit import analyse as A
from saekit import directions as D
from saekit.sae import ReLUSAE, sae_config, SAEMetadata, TopKSAE

HOOK = "blocks.6.hook_resid_post"
TEXT = "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait."


def make_sae(cache: ActivationCache, hook: str = HOOK, d_sae: int = 512, k: int = 16) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(sae_config("topk", cache.d_model, d_sae, k=k,
                            metadata=SAEMetadata(model_name="gemma-3-270m", hook_name=hook)))
    sae.init_from_data(cache.load_shard(0, hook).reshape(-1, cache.d_model))
    return sae


def all_acts(sae, cache: ActivationCache) -> torch.Tensor:
    """Brute force: ``[n_rows, context, d_sae]`` with BOS positions zeroed."""
    acts = torch.cat([cache.load_shard(i, HOOK) for i in range(cache.n_shards)])
    with torch.no_grad():
        feats = sae.encode(acts)
    return feats * (cache.tokens() != cache.manifest.bos_token_id)[..., None]


@pytest.fixture(scope="module")
def cache(small_capture):
    return ActivationCache.open(small_capture)


@pytest.fixture(scope="module")
def sae(cache):
    return make_sae(cache)


def test_top_examples_match_brute_force(sae, cache, model):
    features = [0, 5, 77, 300, 511]
    window = (5, 3)
    found = A.top_activating_examples(sae, cache, features, n_examples=12, window=window,
                                      tokenizer=model.tokenizer)
    brute = all_acts(sae, cache)
    tokens, context = cache.tokens(), cache.context
    for f in features:
        flat = brute[..., f].flatten()
        order = flat.argsort(descending=True)[:12]
        order = order[flat[order] > 0]
        got = found[f]
        assert [(e.row, e.position) for e in got] == [divmod(int(i), context) for i in order]
        assert torch.allclose(torch.tensor([e.max_activation for e in got]), flat[order], atol=1e-5)
        for e in got:
            start, end = max(0, e.position - 5), min(context, e.position + 4)
            assert e.start == start and e.token_ids == tokens[e.row, start:end].tolist()
            assert torch.allclose(torch.tensor(e.activations), brute[e.row, start:end, f],
                                  atol=1e-5)
            assert e.tokens == [model.tokenizer.decode([i]) for i in e.token_ids]
            assert e.token_ids[e.position - start] != cache.manifest.bos_token_id


def test_model_source_matches_cache(sae, cache, model):
    tokens = cache.tokens()[:8]
    from_model = A.top_activating_examples(sae, A.ModelSource(model, tokens, batch_rows=4),
                                           [3, 9], n_examples=5)
    from_cache = A.top_activating_examples(sae, cache, [3, 9], n_examples=5,
                                           tokenizer=model.tokenizer, max_rows=8)
    for f in (3, 9):
        assert [(e.row, e.position) for e in from_model[f]] == \
            [(e.row, e.position) for e in from_cache[f]]
        assert all(abs(a.max_activation - b.max_activation) < 1e-3
                   for a, b in zip(from_model[f], from_cache[f]))


def test_statistics_and_quantiles(sae, cache, model):
    brute = all_acts(sae, cache)
    usable = cache.tokens() != cache.manifest.bos_token_id
    stats = A.feature_statistics(sae, cache)
    flat = brute[usable]  # [tokens, d_sae]
    assert stats.n_tokens == len(flat)
    assert torch.allclose(stats.frequency.float(), (flat > 0).float().mean(0))
    assert torch.allclose(stats.max_activation, flat.max(0).values, atol=1e-5)
    assert torch.allclose(stats.mean_activation, flat.mean(0), atol=1e-5)
    assert torch.equal(stats.histogram.sum(1), (flat > 0).sum(0))
    bands = A.quantile_examples(sae, cache, [1, 2], n_bands=4, per_band=2, n_samples=40,
                                tokenizer=model.tokenizer)
    for f, feature_bands in bands.items():
        assert feature_bands, f"feature {f} has no bands"
        for lower, upper in itertools.pairwise(feature_bands):
            assert lower.high <= upper.low
        for band in feature_bands:
            assert 1 <= len(band.examples) <= 2
            for e in band.examples:
                assert band.low <= e.max_activation <= band.high and e.max_activation > 0
                assert e.max_activation == pytest.approx(float(brute[e.row, e.position, f]),
                                                         abs=1e-5)


def untied(keys: torch.Tensor) -> torch.Tensor:
    """Kept entries whose key is positive and unique in its row and not the row's last (equal
    activations, e.g. after the same first token, may be kept in either order)."""
    unique = (keys[:, :, None] == keys[:, None, :]).sum(-1) == 1
    return unique & (keys > 0) & (keys != keys[:, -1:])


def test_scan_does_not_depend_on_blocks_per_chunk(sae, cache, monkeypatch):
    """Blocks of 3 rows in shards of 8: chunks of 1 block, and of up to 4 (cut at each shard's
    end), give the same statistics, the same random sample and the same examples."""
    monkeypatch.setattr(A, "CHUNK_ELEMENTS", 3 * cache.context * sae.d_sae)
    scans = []
    for blocks in (1, 4):
        monkeypatch.setattr(A, "CHUNK_BLOCKS", blocks)
        scans.append(A.scan_features(sae, cache, None, n_examples=6, n_samples=10,
                                     window=(5, 3), max_rows=30))
    one, four = scans
    for name in ("fire_count", "act_sum", "max_activation", "histogram", "top_values",
                 "sample_keys"):
        assert torch.equal(getattr(one, name), getattr(four, name)), name
    for kind, keys in (("top", one.top_values), ("sample", one.sample_keys)):
        mask = untied(keys)
        assert mask.sum() > 0.8 * (keys > 0).sum()
        for name in ("index", "window", "values"):
            assert torch.equal(getattr(one, f"{kind}_{name}")[mask],
                               getattr(four, f"{kind}_{name}")[mask]), (kind, name)


def test_logit_lens_matches_hf_forward(sae, model):
    feature = 42
    promoted, suppressed = D.logit_lens(model, sae, feature, k=5)
    values = D.logit_lens_values(model, sae, [feature])[0]
    hf = model.original_model
    norm = hf.model.norm.original_component  # HF Gemma3RMSNorm
    direction = sae.W_dec[feature].detach()
    with torch.no_grad():
        logits = norm(direction[None]) @ hf.lm_head.weight.T  # what the model computes
    rms = direction.pow(2).mean().add(norm.eps).sqrt()
    assert torch.allclose(values / rms, logits[0], rtol=1e-4, atol=1e-4)
    top = values.topk(5)
    assert [t for t, _ in promoted] == [model.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert [v for _, v in promoted] == pytest.approx(top.values.tolist())
    assert [v for _, v in suppressed] == pytest.approx(values.topk(5, largest=False).values.tolist())


def test_neighbours_and_map(sae):
    feature = 10
    near = D.nearest_features(sae, feature, k=7)
    W = sae.W_dec.detach()
    cos = F.cosine_similarity(W[feature][None], W, dim=1)
    cos[feature] = -2
    top = cos.topk(7)
    assert [i for i, _ in near] == top.indices.tolist()
    assert [c for _, c in near] == pytest.approx(top.values.tolist(), abs=1e-5)
    ids, coords = D.feature_map(sae, feature, n_neighbours=20)
    assert ids[0] == feature and ids[1:].tolist() == [i for i, _ in D.nearest_features(sae, feature, 20)]
    assert coords.shape == (21, 2) and torch.isfinite(coords).all()


def test_search_ranks_planted_feature_first(cache, model):
    sae = make_sae(cache)
    planted = 123
    ids = model.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.tensor([[model.tokenizer.bos_token_id]]), ids], 1)
    text_acts = A.model_activations(model, HOOK, ids)[0, 1:].float()
    corpus = torch.cat([cache.load_shard(i, HOOK) for i in range(cache.n_shards)])
    corpus = corpus[cache.tokens() != cache.manifest.bos_token_id]
    # A discriminant direction (corpus covariance, lightly regularised), so the planted feature
    # fires on the text's tokens, not just on its one largest-norm token.
    cov = torch.cov(corpus.T.float())
    cov += 0.1 * cov.diagonal().mean() * torch.eye(len(cov))
    direction = F.normalize(torch.linalg.solve(cov, text_acts.mean(0) - corpus.mean(0)), dim=0)
    with torch.no_grad():
        project = lambda x: (x - sae.b_dec) @ direction
        threshold = torch.quantile(project(corpus), 0.995)
        sae.W_enc[:, planted] = 50 * direction
        sae.b_enc[planted] = -50 * threshold
    stats = A.feature_statistics(sae, cache)
    hits = D.search_features(sae, model, TEXT, statistics=stats, top=5)
    assert hits[0].feature == planted, [(h.feature, h.score) for h in hits]
    assert hits[0].mean_activation > 0 and hits[0].frequency < 0.01
    assert sum(a > 0 for a in hits[0].token_activations) > len(hits[0].token_activations) // 2
    assert len(hits[0].token_activations) == ids.shape[1] - 1
    from_cache = D.search_features(sae, text_acts, cache=cache, top=5)
    assert [h.feature for h in from_cache] == [h.feature for h in hits]


def test_search_prefers_rare_feature_over_dense_high_magnitude_one():
    """Feature 0 is dense and large (on 60% of corpus tokens at ~10, 11 on the text); feature 1
    is rare (1% of corpus tokens at ~1.25) and on throughout the text at 1.0; feature 2 never
    fires on the corpus (corpus max 0) and weakly on one text token. The old ``m * log(m / b)``
    ranks the dense feature first; the range-scaled score ranks the rare one first."""
    sae = ReLUSAE(sae_config("relu", 3, 3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    g = torch.Generator().manual_seed(0)
    n = 2000
    corpus = torch.zeros(n, 3)
    corpus[:, 0] = torch.where(torch.rand(n, generator=g) < 0.6,
                               (10 + 2 * torch.randn(n, generator=g)).clamp(6, 16), 0.0)
    rare = torch.randperm(n, generator=g)[:n // 100]
    corpus[rare, 1] = 1.0 + 0.5 * torch.rand(len(rare), generator=g)
    acts = sae.encode(corpus).detach()
    stats = A.FeatureStatistics(torch.arange(3), n, (acts > 0).double().mean(0),
                                acts.max(0).values, acts.mean(0), torch.zeros(3, 90))
    assert stats.max_activation[2] == 0
    text = torch.tensor([[11.0, 1.0, 0.0]] * 8)
    text[3, 2] = 0.4
    hits = D.search_features(sae, text, statistics=stats, top=3)
    by_id = {h.feature: h for h in hits}
    assert [h.feature for h in hits] == [1, 2, 0], [(h.feature, h.score) for h in hits]
    assert by_id[0].raw_score > by_id[1].raw_score > 0  # the old score preferred the dense one
    for h in hits:
        m, b = h.mean_activation, (n * h.corpus_mean + h.mean_activation) / (n + 1)
        assert h.log_ratio == pytest.approx(math.log(m / b), rel=1e-4)
        scale = max(h.corpus_max, h.max_activation)
        assert h.score == pytest.approx(m / scale * math.log(m / b), rel=1e-4)
        assert math.isfinite(h.score)
    assert by_id[2].corpus_max == 0 and by_id[2].max_activation == pytest.approx(0.4)


def test_bad_input_errors(sae, cache):
    with pytest.raises(A.FeatureIndexError, match="d_sae = 512"):
        A.top_activating_examples(sae, cache, [512])
    with pytest.raises(A.FeatureIndexError, match="d_sae = 512"):
        D.nearest_features(sae, -1)
    other = make_sae(cache, hook="blocks.3.hook_resid_post")
    other.cfg.metadata.hook_name = "blocks.5.hook_resid_post"
    with pytest.raises(A.HookMismatchError, match="blocks.5.hook_resid_post"):
        A.feature_statistics(other, cache)
    narrow = TopKSAE(sae_config("topk", 320, 64, k=4, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(A.HookMismatchError, match="d_in = 320"):
        A.feature_statistics(narrow, cache)
    with pytest.raises(A.AnalysisInputError):
        D.search_features(sae, torch.zeros(3, 320), cache=cache)
