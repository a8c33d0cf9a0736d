"""SAE architectures: feature recovery, sparse gradients, SAELens files, scale folding, errors."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saekit.errors import SAEConfigError, SAEInputError, SaekitError
from saekit.sae import (ARCHITECTURES, SAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE,
                        SAEConfig,
                        TopKSAE, load_sae, sae_config)
from saekit.sae.kernels import (encoder_preacts, gather_preacts, masked_row_topk,
                                positive_masked_topk, reused_buffers, row_topk, sparse_decode,
                                workspace)

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
TOPK_LIKE = ("topk", "batchtopk", "matryoshka")
SAELENS_NAME = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
                "matryoshka": "jumprelu"}


def make_config(arch: str, d_in: int = 64, d_sae: int = 256, k: int = 4, **kwargs) -> SAEConfig:
    if arch in TOPK_LIKE:
        kwargs["k"] = k
    return sae_config(architecture=arch, d_in=d_in, d_sae=d_sae, **kwargs)


def sparse_dictionary_data(n: int, d_in: int = 64, n_features: int = 128, per_sample: float = 4.0,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [n_features, d_in] unit-norm, x [n, d_in])``: each x a sparse positive mix."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d_in, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_features, generator=g) < per_sample / n_features
    magnitudes = 0.5 + 1.5 * torch.rand(n, n_features, generator=g)
    return features, (active * magnitudes) @ features


def train(sae: SAE, data: torch.Tensor, steps: int, batch: int = 512, lr: float = 3e-3,
          dead_after: int = 200) -> None:
    """A minimal Adam loop with dead-latent tracking, following the SAE's hooks."""
    g = torch.Generator().manual_seed(1)
    sae.init_from_data(data[:4096])
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    idle_steps = torch.zeros(sae.d_sae)
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        out = sae.training_forward(x, dead_mask=idle_steps > dead_after, progress=step / steps)
        out.losses["loss"].backward()
        sae.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        sae.after_optimizer_step()
        idle_steps = torch.where(out.fired, 0, idle_steps + 1)


def feature_recovery(sae: SAE, features: torch.Tensor) -> float:
    """Mean over true features of the best cosine with a learnt decoder row."""
    rows = F.normalize(sae.W_dec.detach(), dim=1)
    return (features @ rows.T).max(dim=1).values.mean().item()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only add overhead on 2 cores
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ARCHS)
def test_recovers_known_sparse_features(arch, one_thread):
    features, data = sparse_dictionary_data(50_000)
    sae = ARCHITECTURES[arch](make_config(arch, normalize_activations="expected_average_only_in"))
    train(sae, data, steps=1500)
    assert feature_recovery(sae, features) >= 0.9
    with torch.no_grad():
        l0 = (sae.encode(data[-4096:]) > 0).sum(-1).float().mean().item()
    assert 1.0 < l0 < 12.0  # inference sparsity near the true ~4 per sample (TopK: exactly <= 4)
    if arch != "relu":
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5)


def _sparse_and_dense_grads(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor):
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    sparse = torch.autograd.grad(sae.training_forward(x, dead).losses["loss"], params)
    # dense reference of the same loss, through plain autograd
    k, aux_k = sae.cfg.options.k, sae.aux_k
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    x_hat = acts @ sae.W_dec + sae.b_dec
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    error = (x - x_hat).detach()
    aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(aux_k, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu())
    auxk = (error - aux_acts @ sae.W_dec).pow(2).sum() / (error - error.mean(0)).pow(2).sum()
    dense = torch.autograd.grad(fvu + sae.cfg.options.aux_coefficient * auxk, params)
    return sparse, dense


def test_sparse_topk_gradients_match_dense_autograd():
    torch.manual_seed(0)
    sae = TopKSAE(make_config("topk", d_in=24, d_sae=200, k=5, aux_k=7, dtype="float64"))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(64, 24, dtype=torch.float64)
    dead = torch.rand(200) < 0.3
    sparse, dense = _sparse_and_dense_grads(sae, x, dead)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], sparse, dense):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), name


def test_gather_preacts_gradcheck_including_input():
    torch.manual_seed(0)
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(6, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(6, 30, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(30, dtype=torch.float64, requires_grad=True)
    pre = encoder_preacts(x, b_dec, W_enc, b_enc)
    rows, cols = row_topk(pre, 4)
    aux_rows, aux_cols = masked_row_topk(pre, torch.arange(30) % 3 == 0, 3)
    rows, cols = torch.cat([rows, aux_rows]), torch.cat([cols, aux_cols])

    def gathered(x, b_dec, W_enc, b_enc):
        return gather_preacts(encoder_preacts(x, b_dec, W_enc, b_enc), x, b_dec, W_enc, b_enc,
                              rows, cols)

    assert torch.autograd.gradcheck(gathered, (x, b_dec, W_enc, b_enc))


def test_masked_row_topk_positive_only_drops_exactly_the_non_positive_entries():
    torch.manual_seed(0)
    pre = torch.randn(9, 40, dtype=torch.float64)
    allowed = torch.arange(40) % 2 == 1
    rows, cols = masked_row_topk(pre, allowed, 6)
    kept_rows, kept_cols = masked_row_topk(pre, allowed, 6, positive_only=True)
    positive = pre[rows, cols] > 0
    assert 0 < int(positive.sum()) < rows.numel()  # the case is non-trivial
    assert torch.equal(kept_rows, rows[positive]) and torch.equal(kept_cols, cols[positive])
    assert bool(allowed[kept_cols].all()) and bool((kept_rows.diff() >= 0).all())


@pytest.mark.parametrize("k", [1, 3, 6, 25])
def test_positive_masked_topk_keeps_masked_row_topks_positive_entries(k):
    """AuxK's selection: the same entries as masked_row_topk(positive_only=True), in column order,
    with rows holding more positive allowed entries than k (top-k'd) and fewer (kept whole)."""
    torch.manual_seed(0)
    pre = torch.randn(12, 40, dtype=torch.float64) + torch.linspace(-2, 2, 12)[:, None]
    allowed = torch.arange(40) % 5 != 0
    rows, cols = masked_row_topk(pre, allowed, k, positive_only=True)
    kept_rows, kept_cols = positive_masked_topk(pre, allowed.nonzero().squeeze(1), k)
    assert sorted(zip(rows.tolist(), cols.tolist())) == list(zip(kept_rows.tolist(),
                                                                kept_cols.tolist()))
    none_rows, _ = positive_masked_topk(pre, torch.zeros(0, dtype=torch.long), k)
    assert none_rows.numel() == 0


def test_sparse_decode_gradcheck_with_uneven_rows():
    """The CPU decode's own backward (CSR matmul + SDDMM), rows holding 0 to 6 latents."""
    torch.manual_seed(0)
    pre = torch.randn(10, 30, dtype=torch.float64) - 1.0
    pre[3] = -1.0  # a row with no positive entry
    rows, cols = masked_row_topk(pre, torch.arange(30) < 20, 6, positive_only=True)
    counts = torch.bincount(rows, minlength=10)
    assert counts[3] == 0 and len(set(counts.tolist())) > 2
    W_dec = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    vals = pre[rows, cols].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda W, v: sparse_decode(W, rows, cols, v, 10), (W_dec, vals))
    dense = torch.zeros(10, 30, dtype=torch.float64).index_put((rows, cols), vals.detach())
    assert torch.allclose(sparse_decode(W_dec, rows, cols, vals, 10), dense @ W_dec)


def _perturbed(arch: str, **kwargs) -> SAE:
    """An SAE with every parameter and buffer away from its init, as after training."""
    sae = ARCHITECTURES[arch](make_config(arch, d_in=16, d_sae=48, k=3, seed=3, **kwargs))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in [*sae.parameters(), *sae.buffers()]:
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=g))
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(48, generator=g).mul(0.3).log())
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_in_saelens_layout(arch, tmp_path):
    sae = _perturbed(arch)
    sae.cfg.metadata.model_name = "gemma-3-270m"
    sae.cfg.metadata.hook_name = "blocks.6.hook_resid_post"
    sae.cfg.metadata.context_size = 128
    frequency = torch.rand(48)
    sae.save(tmp_path / "sae", firing_frequency=frequency)

    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae)
    x = torch.randn(2, 5, 16)
    for out, expected in zip(loaded(x), sae(x)):
        assert torch.equal(out, expected)
    assert loaded.cfg == sae.cfg

    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_NAME[arch]
    assert {"d_in": 16, "d_sae": 48, "dtype": "float32", "device": "cpu",
            "normalize_activations": "none", "reshape_activations": "none"}.items() <= cfg.items()
    assert cfg["apply_b_dec_to_input"] is sae.cfg.apply_b_dec_to_input
    assert cfg.get("k") == (3 if arch in TOPK_LIKE else None)
    metadata = cfg["metadata"]
    assert metadata["model_name"] == "gemma-3-270m"
    assert metadata["hook_name"] == "blocks.6.hook_resid_post"
    assert {"hook_head_index", "prepend_bos", "context_size", "dataset_path"} <= metadata.keys()
    assert metadata["sae_lens_version"] >= "6"
    assert cfg["saekit"]["architecture"] == arch

    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    expected_keys = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if SAELENS_NAME[arch] == "jumprelu":
        expected_keys.add("threshold")
        assert weights["threshold"].shape == (48,)
    assert set(weights) == expected_keys
    assert weights["W_enc"].shape == (16, 48) and weights["W_dec"].shape == (48, 16)
    sparsity = load_file(tmp_path / "sae" / "sparsity.safetensors")["sparsity"]
    assert torch.allclose(sparsity, torch.log10(frequency + 1e-10))


def test_loads_a_folder_written_by_saelens(tmp_path):
    reference = _perturbed("topk")
    folder = tmp_path / "saelens"
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in reference.state_dict().items()},
              folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": 16, "d_sae": 48, "k": 3, "dtype": "float32",
        "device": "cuda", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre",
                     "neuronpedia_id": "gpt2-small/8-res-jb", "sae_lens_version": "6.12.1"}}))
    loaded = load_sae(folder)
    assert isinstance(loaded, TopKSAE) and loaded.W_dec.device.type == "cpu"
    assert loaded.cfg.metadata.extra == {"neuronpedia_id": "gpt2-small/8-res-jb"}
    x = torch.randn(7, 16)
    assert torch.equal(loaded.encode(x), reference.encode(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_activation_scale_keeps_raw_outputs(arch, tmp_path):
    sae = _perturbed(arch, normalize_activations="expected_average_only_in")
    data = 7.0 * torch.randn(512, 16) + 2.0
    sae.init_from_data(data)
    scale = sae.cfg.activation_scale
    assert scale == pytest.approx((16 / data.pow(2).sum(-1).mean()).sqrt().item(), rel=1e-5)
    x = data[:64]
    x_hat, acts = sae(x)
    sae.fold_activation_scale()
    assert sae.cfg.activation_scale == 1.0 and sae.cfg.normalize_activations == "none"
    x_hat_folded, acts_folded = sae(x)
    assert torch.allclose(x_hat_folded, x_hat, rtol=1e-4, atol=1e-4)
    assert torch.allclose(acts_folded, acts, rtol=1e-4, atol=1e-5)
    assert (acts > 0).sum() > 0

    sae.save(tmp_path / "folded")
    cfg = json.loads((tmp_path / "folded" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg["saekit"]["activation_scale"] == 1.0
    assert torch.allclose(load_sae(tmp_path / "folded")(x)[0], x_hat, rtol=1e-4, atol=1e-4)


def test_warmup_and_unit_norm_hooks():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    relu = ReLUSAE(make_config("relu", d_in=16, d_sae=48, l1_warmup_fraction=0.1))
    start = relu.training_forward(x, progress=0.0).losses
    assert torch.allclose(start["loss"], start["mse"])
    halfway = relu.training_forward(x, progress=0.05).losses
    expected = halfway["mse"] + 0.5 * relu.cfg.options.l1_coefficient * halfway["l1"]
    assert torch.allclose(halfway["loss"], expected)

    sae = JumpReLUSAE(make_config("jumprelu", d_in=16, d_sae=48))
    sae.training_forward(x).losses["loss"].backward()
    sae.before_optimizer_step()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(48), atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48))


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_sum_makes_rank_losses_global(arch):
    """Two ranks holding the same half-batch: each rank's losses are the full batch's, and the
    summed rank gradients are its gradient."""
    torch.manual_seed(0)
    half = torch.randn(32, 16)
    dead = torch.arange(48) % 4 == 0
    whole, rank = (_perturbed(arch) for _ in range(2))
    full = whole.training_forward(torch.cat([half, half]), dead_mask=dead, progress=0.5)
    two_ranks = rank.training_forward(half, dead_mask=dead, progress=0.5,
                                      batch_sum=lambda value: value + value.detach())
    assert full.losses.keys() == two_ranks.losses.keys()
    for name, value in full.losses.items():
        assert torch.allclose(two_ranks.losses[name], value, rtol=1e-5), name
    full.losses["loss"].backward()
    two_ranks.losses["loss"].backward()
    for p_full, p_rank in zip(whole.parameters(), rank.parameters()):
        assert torch.allclose(2 * p_rank.grad, p_full.grad, rtol=1e-4, atol=1e-6)


def test_auxk_is_zero_without_dead_latents():
    sae = _perturbed("topk")
    x = torch.randn(32, 16)
    assert sae.training_forward(x).losses["auxk"] == 0
    assert sae.training_forward(x, dead_mask=torch.zeros(48, dtype=torch.bool)).losses["auxk"] == 0
    assert sae.training_forward(x, dead_mask=torch.ones(48, dtype=torch.bool)).losses["auxk"] > 0


def test_batchtopk_threshold_tracks_smallest_kept_activation():
    torch.manual_seed(0)
    sae = BatchTopKSAE(make_config("batchtopk", d_in=16, d_sae=48, k=3))
    x = torch.randn(64, 16)
    assert torch.all(sae.threshold == 0)
    step = sae.training_forward(x)
    assert step.l0 == pytest.approx(3.0)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    smallest_kept = pre.flatten().topk(3 * 64).values.min()
    assert torch.allclose(sae.threshold, smallest_kept.expand(48))


def test_k_must_be_below_d_sae():
    for arch in ("topk", "batchtopk"):
        with pytest.raises(SAEConfigError, match=r"1 <= k < d_sae = 48, got k = 48") as info:
            ARCHITECTURES[arch](make_config(arch, d_in=16, d_sae=48, k=48))
        assert isinstance(info.value, ValueError) and isinstance(info.value, SaekitError)
    with pytest.raises(SAEConfigError, match="needs an integer k"):
        TopKSAE(sae_config(architecture="topk", d_in=16, d_sae=48, k=None))
    with pytest.raises(SAEConfigError, match="normalize_activations"):
        make_config("relu", normalize_activations="layer_norm")


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_d_in_names_both_sizes(arch):
    sae = ARCHITECTURES[arch](make_config(arch, d_in=16, d_sae=48, k=3))
    x = torch.randn(4, 20)
    for call in (sae.encode, sae.forward, sae.training_forward):
        with pytest.raises(SAEInputError, match=r"size 20 .*d_in = 16") as info:
            call(x)
        assert isinstance(info.value, ValueError)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(SAEConfigError, match="not a saved SAE"):
        load_sae(tmp_path)
    _perturbed("relu").save(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["saekit"]
    cfg["architecture"] = "gated"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SAEConfigError, match="gated"):
        load_sae(tmp_path / "sae")
    cfg_path.write_text(json.dumps({**cfg, "architecture": "topk", "k": 3,
                                    "rescale_acts_by_decoder_norm": True}))
    with pytest.raises(SAEConfigError, match="rescale_acts_by_decoder_norm"):
        load_sae(tmp_path / "sae")
    del cfg["apply_b_dec_to_input"]
    cfg_path.write_text(json.dumps({**cfg, "architecture": "standard"}))
    assert load_sae(tmp_path / "sae").cfg.apply_b_dec_to_input  # SAELens's default, not saekit's


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parameter_groups_cover_every_parameter_once(arch):
    sae = ARCHITECTURES[arch](make_config(arch))
    groups = sae.parameter_groups()
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in sae.parameters())
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    if arch == "jumprelu":
        assert scales[id(sae.log_threshold)] == sae.cfg.options.jumprelu_threshold_lr_scale > 1
        assert scales[id(sae.W_enc)] == 1.0
    else:
        assert set(scales.values()) == {1.0}


def test_matryoshka_loss_and_gradients_match_a_dense_reference():
    """The objective is the mean over nested prefixes of the FVU of the BatchTopK-selected
    entries restricted to each prefix; its sparse gradients equal dense autograd's."""
    torch.manual_seed(0)
    sae = MatryoshkaSAE(make_config("matryoshka", d_in=24, d_sae=64, k=5, dtype="float64",
                                    matryoshka_prefixes=3, matryoshka_growth=4.0))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert sae.widths == [4, 16, 64]
    x = torch.randn(32, 24, dtype=torch.float64)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    step = sae.training_forward(x)
    sparse = torch.autograd.grad(step.losses["loss"], params)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    relu = pre.relu()
    cut = relu.flatten().topk(5 * 32).values.min()
    acts = relu * (relu >= cut)
    variance = (x - x.mean(0)).pow(2).sum()
    fvus = [(x - acts[:, :m] @ sae.W_dec[:m] - sae.b_dec).pow(2).sum() / variance
            for m in sae.widths]
    objective = torch.stack(fvus).mean()
    dense = torch.autograd.grad(objective, params)
    assert torch.allclose(step.losses["loss"], objective)
    assert torch.allclose(step.losses["fvu"], fvus[-1])
    for a, b in zip(sparse, dense):
        assert torch.allclose(a, b, atol=1e-10)


def test_matryoshka_prefix_reconstructs_alone_where_batchtopk_does_not(one_thread):
    """Trained on the same data (64 equally frequent true features), the first 16 of 256
    latents of a Matryoshka SAE explain about a quarter of the input on their own, about the
    most 16 features can; the first 16 of a BatchTopK SAE (no order) explain ~3%."""
    features, data = sparse_dictionary_data(30_000, n_features=64, per_sample=3.0)
    held = data[-4096:]
    explained = {}
    for arch in ("batchtopk", "matryoshka"):
        sae = ARCHITECTURES[arch](make_config(arch, d_sae=256, k=3,
                                              normalize_activations="expected_average_only_in"))
        train(sae, data[:-4096], steps=800)
        with torch.no_grad():
            acts = sae.encode(held)
            acts[:, 16:] = 0
            error = (held - sae.decode(acts)).pow(2).sum()
        explained[arch] = 1 - float(error / (held - held.mean(0)).pow(2).sum())
    assert explained["matryoshka"] > 0.2 and explained["matryoshka"] > explained["batchtopk"] + 0.15


def test_workspace_is_reused_only_inside_reused_buffers_and_released_after():
    x = torch.zeros(4, 3)
    assert workspace("preacts", (4, 8), x) is not workspace("preacts", (4, 8), x)  # outside
    with reused_buffers():
        kept = workspace("preacts", (4, 8), x)
        assert workspace("preacts", (4, 8), x) is kept  # the next step, or another SAE
        assert workspace("preacts", (2, 8), x).shape == (2, 8)  # another shape: a new one
        assert workspace("preacts", (2, 8), x.double()).dtype == torch.float64
        released = weakref.ref(workspace("preacts", (4, 8), x))
    del kept
    gc.collect()
    assert released() is None
