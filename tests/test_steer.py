"""Steering through SAE latents: exact semantics, positions, hook cleanup, generation, errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from saekit.cli import build_parser
from saekit import HookNameError
from saekit.sae import sae_config, SAEMetadata, TopKSAE
from saekit.directions import mean_difference_direction
from saekit.generation import generate, sample_tokens
from saekit.steer import Intervention, PositionTracker, SteeringError, SteeringVector, steer

HOOK = "blocks.6.hook_resid_post"
PROMPT = "My favourite place is"
BIG = 2e4  # residual norms at layer 6 are ~3.5e3 (BOS: ~5e4); this clamp dominates


@pytest.fixture(scope="module")
def sae(model):
    """A small TopK SAE (tied, unit-norm decoder rows) with b_dec fitted to real activations."""
    text = "The Golden Gate Bridge spans the strait. Paris is the capital of France, I think."
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=HOOK)
    sae = TopKSAE(sae_config("topk", 640, 512, k=16, metadata=SAEMetadata(hook_name=HOOK)))
    sae.init_from_data(cache[HOOK][0, 1:])
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPT)


@pytest.fixture(scope="module")
def clean(model, tokens):
    """(logits, hook activation [pos, 640]) of the unsteered model on ``tokens``."""
    logits, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return logits, cache[HOOK][0]


def expected_output(sae, x, intervention):
    """The documented formula: decode(edited latents) + (x - decode(latents))."""
    latents = sae.encode(x)
    return sae.decode(intervention.edit(latents)) + x - sae.decode(latents)


def steered_activation(model, tokens, *args, **kwargs):
    with steer(model, *args, **kwargs):
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK][0]


def no_steering_left(model):
    return not model.hook_dict[HOOK].fwd_hooks and not model.original_model._forward_pre_hooks


def test_empty_steering_leaves_logits_bit_identical(model, sae, tokens, clean):
    for context in (steer(model), steer(model, sae), steer(model, sae, clamp={}, ablate=[]),
                    steer(model, sae, clamp={3: BIG}, positions="generated")):
        with context:
            assert torch.equal(model(tokens), clean[0])


def test_clamp_sets_the_feature_and_leaves_bos(model, sae, tokens, clean):
    x = clean[1]
    feature = int(sae.encode(x[1:]).sum(0).argmin())  # a latent off on these tokens
    out = steered_activation(model, tokens, sae, clamp={feature: BIG})
    assert torch.equal(out[0], x[0])
    expected = expected_output(sae, x[1:], Intervention(sae, clamp={feature: BIG}))
    torch.testing.assert_close(out[1:], expected, rtol=1e-5, atol=1e-2)
    assert torch.allclose(sae.encode(out[1:])[:, feature], torch.full((len(x) - 1,), BIG),
                          rtol=0.05)


def test_ablation_zeroes_the_feature(model, sae, tokens, clean):
    x = clean[1]
    before = sae.encode(x[1:])
    feature = int(before.sum(0).argmax())
    assert before[:, feature].max() > 0
    out = steered_activation(model, tokens, sae, ablate=[feature])
    assert torch.equal(out[0], x[0])
    torch.testing.assert_close(out[1:], expected_output(sae, x[1:], Intervention(
        sae, ablate=[feature])), rtol=1e-5, atol=1e-2)
    assert sae.encode(out[1:])[:, feature].abs().max() < 1e-2 * before[:, feature].max()


def test_add_applies_after_clamp():
    sae = TopKSAE(sae_config("topk", 8, 16, k=2))
    acts = torch.zeros(3, 16)
    edited = Intervention(sae, clamp={1: 5.0, 2: 1.0}, add={1: 2.0}, ablate=[4]).edit(acts + 1)
    assert edited[0, 1] == 7.0 and edited[0, 2] == 1.0 and edited[0, 4] == 0.0
    assert edited[0, 0] == 1.0


def test_several_interventions_and_hooks(model, sae, tokens, clean):
    plan = [(sae, {"clamp": {3: BIG}}),
            Intervention(sae, ablate=[0, 1], hook="blocks.3.hook_resid_post")]
    with steer(model, plan):
        assert not torch.equal(model(tokens), clean[0])
        assert len(model.hook_dict["blocks.3.hook_resid_post"].fwd_hooks) == 1
    assert no_steering_left(model) and not model.hook_dict["blocks.3.hook_resid_post"].fwd_hooks
    assert torch.equal(model(tokens), clean[0])


def test_steering_removed_on_exit_and_on_exception(model, sae, tokens, clean):
    with steer(model, sae, clamp={3: BIG}):
        assert not torch.equal(model(tokens), clean[0])
    assert no_steering_left(model)
    assert torch.equal(model(tokens), clean[0])
    with pytest.raises(RuntimeError, match="boom"), steer(model, sae, clamp={3: BIG}):
        raise RuntimeError("boom")
    assert no_steering_left(model)
    assert torch.equal(model(tokens), clean[0])


def test_generated_positions_leave_the_prompt_untouched(model, sae, tokens):
    before, after = [], []
    feature = 3
    # hooks run in the order added: `before` sees the input of the steering hook, `after` its output
    with (model.hooks(fwd_hooks=[(HOOK, lambda act, hook: before.append(act.clone()))]),
          steer(model, sae, clamp={feature: BIG}, positions="generated"),
          model.hooks(fwd_hooks=[(HOOK, lambda act, hook: after.append(act.clone()))])):
        model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False,
                       stop_at_eos=False)
    assert no_steering_left(model)
    assert [a.shape[1] for a in after] == [tokens.shape[1], 1, 1]  # KV cache: new tokens only
    assert torch.equal(before[0], after[0])  # the prompt pass
    for x_in, x_out in zip(before[1:], after[1:]):
        assert not torch.equal(x_in, x_out)
        assert torch.allclose(sae.encode(x_out[0])[:, feature], torch.tensor(BIG), rtol=0.05)


def test_position_tracker_prompt_and_kv_cache():
    class Cache:
        def __init__(self, n):
            self.n = n

        def get_seq_length(self):
            return self.n

    tracker = PositionTracker("generated", skip_bos=True, bos_token_id=2)
    prompt = torch.tensor([[2, 5, 6, 7]])
    def act(n):
        return torch.zeros(1, n, 4)

    tracker.observe(None, (prompt,), {})
    assert tracker.mask(act(4)) is None
    tracker.observe(None, (torch.tensor([[8]]),), {"past_key_values": Cache(4)})
    assert tracker.mask(act(1)).tolist() == [[True]]
    tracker.observe(None, (torch.tensor([[2, 5, 6, 7, 8, 9]]),), {})  # no cache, extends prompt
    assert tracker.mask(act(6)).tolist() == [[False] * 4 + [True] * 2]
    tracker.observe(None, (torch.tensor([[2, 9, 9]]),), {})  # a new prompt
    assert tracker.mask(act(3)) is None
    tracker = PositionTracker("all", skip_bos=True, bos_token_id=2)
    tracker.observe(None, (torch.tensor([[0, 2, 5]]),), {})  # left-padded: BOS not at 0
    assert tracker.mask(act(3)).tolist() == [[False, False, True]]


def test_generate_is_seeded_and_a_huge_clamp_changes_the_text(model, sae):
    kwargs = {"max_new_tokens": 4, "temperature": 0.7, "seed": 0}
    plain = generate(model, PROMPT, **kwargs)
    assert generate(model, PROMPT, **kwargs) == plain
    assert plain and not plain.startswith(PROMPT)
    steered = generate(model, PROMPT, sae, clamp={3: BIG}, **kwargs)
    assert steered != plain
    assert no_steering_left(model)


def test_cli_prints_steered_and_unsteered(model, sae, monkeypatch, capsys):
    generation = importlib.import_module("saekit.generation")
    monkeypatch.setattr(generation, "load_sae_and_model", lambda folder, device: (sae, model))
    parser = build_parser()
    args = parser.parse_args(["steer", "--sae", "unused", "--feature", "3", "--value", str(BIG),
                              "--prompt", PROMPT, "--compare", "--max-new-tokens", "2"])
    args.run(args)
    out = capsys.readouterr().out
    assert "=== steered: clamp feature 3 = 20000" in out and "=== unsteered" in out
    assert out.count(PROMPT) == 2


def test_steering_vector_adds_its_scaled_vector_except_at_bos(model, tokens, clean):
    vector = torch.linspace(-1, 1, 640)
    x = steered_activation(model, tokens, SteeringVector(vector, HOOK, scale=300.0))
    assert torch.equal(x[0], clean[1][0])  # BOS untouched
    torch.testing.assert_close(x[1:], clean[1][1:] + 300.0 * vector, rtol=1e-6, atol=1e-3)
    assert no_steering_left(model)
    for empty in (SteeringVector(vector, HOOK, scale=0.0), SteeringVector(0 * vector, HOOK)):
        with steer(model, empty):
            assert torch.equal(model(tokens), clean[0])


def test_mean_difference_direction_is_the_difference_of_means(model):
    texts = ["The Golden Gate Bridge", "San Francisco Bay at dusk"]
    reference = torch.randn(50, 640) * 100
    acts = [model.run_with_cache(model.to_tokens(t), names_filter=HOOK)[1][HOOK][0, 1:]
            for t in texts]
    expected = torch.cat(acts).mean(0) - reference.mean(0)
    got = mean_difference_direction(model, HOOK, texts, reference)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-2)


def test_batched_generation_matches_one_prompt_at_a_time(model, sae):
    """Text prompts are generated as one left-padded batch; greedy, each row equals the same
    prompt generated alone, unsteered and steered (the padding is masked, BOS skipped)."""
    prompts = ["Tell me about your weekend.", "I think that", PROMPT]
    vector = SteeringVector(torch.linspace(-1, 1, 640), HOOK, scale=100.0)
    for plan in ([], [Intervention(sae, clamp={3: 50.0})], [vector]):
        batch = sample_tokens(model, prompts, plan, max_new_tokens=5, temperature=0)
        for prompt, row in zip(prompts, batch):
            alone = sample_tokens(model, model.to_tokens(prompt), plan, max_new_tokens=5,
                                  temperature=0)
            assert row.tolist() == alone[0].tolist(), (prompt, plan)
    assert no_steering_left(model)


def test_bad_input_gets_clear_errors(model, sae):
    with pytest.raises(SteeringError, match="d_sae = 512"):
        steer(model, sae, clamp={512: 1.0}).__enter__()
    with pytest.raises(SteeringError, match="integers"):
        Intervention(sae, clamp={1.5: 1.0})
    with pytest.raises(SteeringError, match="finite"):
        Intervention(sae, add={1: float("nan")})
    with pytest.raises(SteeringError, match="both clamped and ablated"):
        Intervention(sae, clamp={1: 1.0}, ablate=[1])
    with pytest.raises(HookNameError, match="no hook"):
        steer(model, sae, clamp={1: 1.0}, hook="blocks.6.hook_resid_pots").__enter__()
    with pytest.raises(SteeringError, match="positions"):
        steer(model, sae, positions="prompt").__enter__()
    with pytest.raises(SteeringError, match="one bare SAE"):
        steer(model, clamp={1: 1.0}).__enter__()
    narrow = TopKSAE(sae_config("topk", 64, 128, k=4, metadata=SAEMetadata(hook_name=HOOK)))
    with pytest.raises(SteeringError, match="d_in = 64"):
        steer(model, narrow, clamp={1: 1.0}).__enter__()
    with pytest.raises(SteeringError, match="need an sae"):
        generate(model, PROMPT, clamp={1: 1.0})
    with pytest.raises(SteeringError, match="1-D tensor"):
        SteeringVector(torch.zeros(2, 640), HOOK)
    with pytest.raises(SteeringError, match="NaN or inf"):
        SteeringVector(torch.full((640,), float("inf")), HOOK)
    with pytest.raises(SteeringError, match="width 64, but"):
        steer(model, SteeringVector(torch.ones(64), HOOK)).__enter__()
    assert no_steering_left(model)


def test_a_clamp_too_large_for_float32_is_an_error_not_an_empty_text(model):
    """Issue 12 item 11: clamping a feature of the shipped SAE to 1e38 made the logits NaN and
    generated nothing, exit 0."""
    from saekit.demo import SHIPPED_SAE
    from saekit.sae import load_sae

    shipped = load_sae(SHIPPED_SAE)
    with pytest.raises(SteeringError, match="not finite.*clamp 3=1e\\+38"):
        generate(model, PROMPT, shipped, clamp={3: 1e38}, max_new_tokens=3, temperature=0)
    assert no_steering_left(model)
