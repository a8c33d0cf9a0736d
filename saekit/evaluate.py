"""Evaluate SAEs: reconstruction quality, sparsity, and what splicing them into the model costs.

``reconstruction_metrics`` scores an SAE on activations alone. ``downstream_metrics`` runs the
model on token rows ``[n_rows, context]`` (each starting with BOS) three times: clean, with the
activation at the SAE's hook replaced by its reconstruction (spliced), and replaced by zeros.
BOS positions carry huge activations and are left clean in every run.

Definitions:

* scored predictions: position t of a row (predicting token t + 1) counts when
  ``tokens[t] != BOS`` (the activation there was spliced) and ``tokens[t + 1] != BOS``
  (the target is a real token, not a document boundary);
* L = mean next-token cross-entropy (nats) over the scored predictions;
* CE-loss recovered = (L_zero - L_spliced) / (L_zero - L_clean): 1 for a perfect
  reconstruction, 0 for one no better than zeros; ΔLM loss = L_spliced - L_clean;
* KL = mean over scored predictions of KL(p_clean || p_spliced) (nats);
* FVU, L0, cosine, ... (``reconstruction_metrics``) over the activations at every non-BOS
  position; a latent is dead below firing frequency 1e-6, dense above 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saekit.config import DEVICE_HELP, check_fields, setting
from saekit.errors import SaekitError
from saekit.files import atomic_path, check_writable, write_json
from saekit.formats import SAE_HELP, load_foreign_sae
from saekit.sae import SAE
from saekit.model import check_hooks, loaded_model_name

DEAD_FREQUENCY = 1e-6
DENSE_FREQUENCY = 0.1
DEFAULT_EVAL_TOKENS = 65_536


@dataclass
class EvalConfig:
    """What ``saekit eval`` measures (its flags are these fields; ``evaluate_sae`` runs it)."""

    sae: str = setting("", SAE_HELP, required=True)
    subfolder: str | None = setting(None, "folder of the SAE inside --sae")
    dataset: str = setting("default", "corpus: 'default', a local file or a dataset name")
    tokens: int = setting(DEFAULT_EVAL_TOKENS, "tokens to evaluate on", ge=2)
    context: int = setting(128, "row length", ge=2)
    out: str = setting("eval.json", "the report (JSON; the density plot goes next to it)")
    seed: int = setting(0, "corpus shuffle seed")
    batch_rows: int = setting(4, "rows per forward pass", ge=1)
    model: str | None = setting(None, "model (default: the SAE's metadata, else gemma-3-270m)")
    hook: str | None = setting(None, "hook (default: the SAE's metadata)")
    hook_out: str | None = setting(None, "a transcoder's output hook, where it is spliced "
                                   "(default: its metadata)")
    device: str | None = setting(None, DEVICE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
KL_CHUNK = 256  # predictions per chunk when summing KL over a [n, vocab] pair


class EvaluationError(SaekitError, ValueError):
    """Evaluation cannot run with these inputs (no tokens, no hook to splice at, ...)."""


class ReconstructionStats:
    """Running sums behind ``reconstruction_metrics``: ``add`` batches, then ``metrics``."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str | None = None) -> None:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.n = 0
        self.sum_x = zeros(d_in)  # [d_in]
        self.sum_sq_x, self.sum_err, self.sum_cos = zeros(), zeros(), zeros()
        self.fires = zeros(d_sae)

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, acts: Tensor) -> None:
        """Add activations ``x`` [n, d_in], reconstructions ``x_hat`` [n, d_in] and latent
        activations ``acts`` [n, d_sae]."""
        x64, err = x.double(), (x - x_hat).double()
        self.sum_x += x64.sum(0)
        self.sum_sq_x += x64.pow(2).sum()
        self.sum_err += err.pow(2).sum()
        self.sum_cos += F.cosine_similarity(x, x_hat, dim=-1).double().sum()
        self.fires += (acts != 0).sum(0).double()
        self.n += len(x)

    def metrics(self) -> dict:
        """FVU, MSE, cosine, L0, dead/dense fractions and ``firing_frequency`` [d_sae]."""
        if self.n == 0:
            raise EvaluationError("No activations to evaluate on.")
        variance = self.sum_sq_x - self.sum_x.pow(2).sum() / self.n
        fvu = float(self.sum_err / variance)
        frequency = (self.fires / self.n).float().cpu()
        return {
            "tokens": self.n,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse": float(self.sum_err / self.n),
            "cosine": float(self.sum_cos / self.n),
            "l0": float(self.fires.sum() / self.n),
            "dead_fraction": float((frequency < DEAD_FREQUENCY).float().mean()),
            "dense_fraction": float((frequency > DENSE_FREQUENCY).float().mean()),
            "firing_frequency": frequency,
        }


@torch.no_grad()
def reconstruction_metrics(sae: SAE, activations: Iterable[torch.Tensor],
                           chunk: int = 4096) -> dict:
    """FVU, MSE, cosine, L0 and firing frequencies of ``sae`` over ``activations`` ([n, d_in] each;
    a transcoder's rows are [input | target], as ``ActivationStream`` gives them with a
    ``target_hook``, and its FVU is the target's).

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens (mean taken over all of
    them); explained variance = 1 - FVU; cosine: mean over tokens of cos(x, x_hat); L0: mean
    number of non-zero latents per token. ``firing_frequency`` [d_sae] is the fraction of
    tokens each latent is non-zero on; dead: below 1e-6, dense: above 0.1.
    """
    device = sae.W_dec.device
    stats = ReconstructionStats(sae.d_out, sae.d_sae, device)
    for block in activations:
        for rows in block.split(chunk):
            x, target = sae.split_pair(rows.to(device, sae.W_dec.dtype))
            x_hat, acts = sae(x)
            stats.add(x if target is None else target, x_hat, acts)
    return stats.metrics()


def ce_loss_recovered(clean: float, spliced: float, zero: float) -> float:
    """(zero - spliced) / (zero - clean): 1.0 when splicing costs nothing, 0.0 when it is as bad
    as zero ablation; NaN when zero ablation costs nothing either."""
    gap = float(zero) - float(clean)
    return float("nan") if gap == 0 else (float(zero) - float(spliced)) / gap


def _scored_log_probs(model, rows: Tensor, fwd_hooks: list, scored: Tensor) -> Tensor:
    """Log-probabilities [n_scored, vocab] at the scored predictions of ``rows`` [b, context]."""
    logits = model.run_with_hooks(rows, return_type="logits", fwd_hooks=fwd_hooks)
    return logits[:, :-1][scored].float().log_softmax(-1)


def _cross_entropy_sum(log_probs: Tensor, targets: Tensor) -> float:
    return -log_probs.gather(1, targets[:, None]).double().sum().item()


def _kl_sum(log_p: Tensor, log_q: Tensor) -> float:
    """Sum over rows of KL(p || q) for log-probabilities [n, vocab], in chunks of rows."""
    total = 0.0
    for lp, lq in zip(log_p.split(KL_CHUNK), log_q.split(KL_CHUNK), strict=True):
        total += (lp.exp() * (lp - lq)).double().sum().item()
    return total


def splice_hooks(sae: SAE, hook: str, hook_out: str | None, at: Tensor,
                 stats: ReconstructionStats) -> list:
    """Forward hooks that replace the activation at the positions ``at`` [batch, pos] by the
    SAE's reconstruction and add each batch to ``stats``. An SAE reads and writes ``hook``; a
    transcoder reads ``hook`` and writes ``hook_out`` (the input is held until the output
    hook fires later in the same pass)."""
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    held: dict[str, Tensor] = {}

    def hold_input(act: Tensor, hook) -> Tensor:
        held["x"] = act[at].to(device, dtype)
        return act

    def splice(act: Tensor, hook) -> Tensor:
        target = act[at].to(device, dtype)
        x_hat, acts = sae(held.pop("x") if hook_out else target)
        stats.add(target, x_hat, acts)
        out = act.clone()
        out[at] = x_hat.to(act.device, act.dtype)
        return out

    return [(hook, hold_input), (hook_out, splice)] if hook_out else [(hook, splice)]


def spliced_hooks_of(sae: SAE, hook_name: str | None = None,
                     hook_out: str | None = None) -> tuple[str, str | None]:
    """``(hook the SAE reads, hook a transcoder writes or None)``, from the arguments or else
    the SAE's metadata; ``EvaluationError`` when one is unknown."""
    hook = hook_name or sae.cfg.metadata.hook_name
    if not hook:
        raise EvaluationError("The SAE's metadata names no hook to splice it in at: pass "
                              "hook_name (--hook), e.g. 'blocks.6.hook_resid_post'.")
    if not sae.cfg.transcoder:
        return hook, None
    hook_out = hook_out or sae.cfg.metadata.hook_name_out
    if not hook_out:
        raise EvaluationError("The transcoder's metadata names no output hook: pass hook_out "
                              "(--hook-out), e.g. 'blocks.6.hook_mlp_out'.")
    return hook, hook_out


@torch.no_grad()
def downstream_metrics(model, sae: SAE, tokens: Tensor, batch_rows: int = 4,
                       hook_name: str | None = None, progress: bool = False,
                       hook_out: str | None = None) -> dict:
    """Splicing metrics of ``sae`` in ``model`` on ``tokens`` [n_rows, context] (module docstring).

    The SAE goes in at ``hook_name`` (default ``sae.cfg.metadata.hook_name``). A transcoder
    reads ``hook_name`` and replaces ``hook_out`` (default ``metadata.hook_name_out``, e.g.
    the MLP's output): the zero-ablation baseline then zeroes ``hook_out``. Runs the full
    model three times per batch of ``batch_rows`` rows; only one batch's [rows, context, vocab]
    logits exist at a time. Returns ``ce_loss_clean``, ``ce_loss_spliced``, ``ce_loss_zero``,
    ``ce_loss_recovered``, ``delta_lm_loss``, ``kl_div``, ``scored_predictions``, ``rows``,
    ``context`` and ``reconstruction_metrics``'s keys (``tokens``: non-BOS positions).
    """

    hook, hook_out = spliced_hooks_of(sae, hook_name, hook_out)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.is_floating_point():
        raise EvaluationError(f"tokens must be integer rows [n_rows, context >= 2], got shape "
                              f"{tuple(tokens.shape)} ({tokens.dtype}).")
    if batch_rows < 1:
        raise EvaluationError(f"batch_rows must be at least 1, got {batch_rows}.")
    check_hooks(model, [hook, hook_out] if hook_out else [hook])
    bos = model.tokenizer.bos_token_id
    device = next(model.parameters()).device
    stats = ReconstructionStats(sae.d_out, sae.d_sae, sae.W_dec.device)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    n_scored = 0
    bar = tqdm(total=tokens.numel(), unit="tok", desc="eval", disable=not progress)
    for rows in tokens.split(batch_rows):
        rows = rows.to(device)
        spliced_at = rows != bos  # [b, context]
        scored = spliced_at[:, :-1] & (rows[:, 1:] != bos)  # [b, context - 1]
        targets = rows[:, 1:][scored]

        def ablate(act: Tensor, hook, at: Tensor = spliced_at) -> Tensor:
            return act.masked_fill(at.reshape(*at.shape, *[1] * (act.ndim - 2)), 0)

        clean = _scored_log_probs(model, rows, [], scored)
        spliced = _scored_log_probs(model, rows,
                                    splice_hooks(sae, hook, hook_out, spliced_at, stats), scored)
        sums["clean"] += _cross_entropy_sum(clean, targets)
        sums["spliced"] += _cross_entropy_sum(spliced, targets)
        sums["kl"] += _kl_sum(clean, spliced)
        del clean, spliced
        sums["zero"] += _cross_entropy_sum(
            _scored_log_probs(model, rows, [(hook_out or hook, ablate)], scored), targets)
        n_scored += len(targets)
        bar.update(rows.numel())
    bar.close()
    if n_scored == 0:
        raise EvaluationError("No predictions to score: every position or target is BOS.")
    loss = {name: total / n_scored for name, total in sums.items()}
    return {
        "ce_loss_clean": loss["clean"],
        "ce_loss_spliced": loss["spliced"],
        "ce_loss_zero": loss["zero"],
        "ce_loss_recovered": ce_loss_recovered(loss["clean"], loss["spliced"], loss["zero"]),
        "delta_lm_loss": loss["spliced"] - loss["clean"],
        "kl_div": loss["kl"],
        "scored_predictions": n_scored,
        "rows": len(tokens),
        "context": tokens.shape[1],
        **stats.metrics(),
    }


def density_histogram(firing_frequency: Tensor, path: str | Path,
                      dead_threshold: float = DEAD_FREQUENCY,
                      dense_threshold: float = DENSE_FREQUENCY,
                      title: str = "Latent density") -> Path:
    """Write a PNG histogram of log10 firing frequency ([d_sae]) of the live latents.

    Dead latents (frequency below ``dead_threshold``) cannot go on a log axis: they are counted
    in the annotation; a dashed line marks ``dense_threshold``. Written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    frequency = torch.as_tensor(firing_frequency).detach().double().flatten().cpu()
    dead = frequency < dead_threshold
    n_dense = int((frequency > dense_threshold).sum())
    low = math.log10(dead_threshold)
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(frequency[~dead].log10().numpy(), bins=torch.linspace(low, 0, 61).numpy(),
            color="tab:blue")
    ax.axvline(math.log10(dense_threshold), color="tab:red", linestyle="--", linewidth=1,
               label=f"dense: > {dense_threshold:g}")
    ax.set_xlim(low, 0)
    ax.set_xlabel("log10 firing frequency (fraction of tokens a latent is active on)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    ax.legend(loc="upper right")
    ax.text(0.02, 0.97, f"{int(dead.sum()):,} of {len(frequency):,} latents dead "
            f"(< {dead_threshold:g}, not shown)\n{n_dense:,} dense",
            transform=ax.transAxes, va="top", fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def evaluate_sae(sae_dir: str | Path, dataset: str = "default", tokens: int = DEFAULT_EVAL_TOKENS,
                 context: int = 128, out: str | Path = "eval.json", seed: int = 0,
                 batch_rows: int = 4, subfolder: str | None = None,
                 model_name: str | None = None, hook_name: str | None = None,
                 device: str | torch.device | None = None, model=None,
                 progress: bool = False, hook_out: str | None = None) -> dict:
    """Evaluate the SAE at ``sae_dir`` (any layout ``load_foreign_sae`` reads) end to end.

    Loads the model its metadata names (``model_name`` overrides; default gemma-3-270m) unless
    ``model`` is given, packs ``tokens // context`` rows of ``dataset`` (shuffled by ``seed``),
    computes ``downstream_metrics`` and writes them to ``out`` (JSON) with a density histogram
    ``<out stem>_density.png`` beside it, atomically. Returns the report written.
    """
    from saekit import __version__
    from saekit.corpus import load_corpus, pack_token_rows
    from saekit.model import DEFAULT_MODEL, load_model

    if context < 2 or tokens < context:
        raise EvaluationError(f"Need context >= 2 and tokens >= context, got tokens={tokens}, "
                              f"context={context}.")
    check_writable(out)  # before the work, not at the final write
    sae = load_foreign_sae(sae_dir, subfolder=subfolder, model_name=model_name,
                           hook_name=hook_name)
    name = sae.cfg.metadata.model_name or DEFAULT_MODEL
    if model is None:
        model = load_model(name, device=device)
    name = loaded_model_name(model, name)
    sae = sae.to(next(model.parameters()).device).eval()
    rows = pack_token_rows(load_corpus(dataset, seed=seed), model.tokenizer, tokens // context,
                           context)
    metrics = downstream_metrics(model, sae, rows, batch_rows, progress=progress,
                                 hook_out=hook_out)
    frequency = metrics.pop("firing_frequency")
    out = Path(out)
    plot = out.with_name(f"{out.stem}_density.png")
    density_histogram(frequency, plot, title=f"Latent density: {sae.cfg.architecture}, "
                      f"d_sae {sae.d_sae}, {metrics['tokens']:,} tokens")
    report = {
        "sae": str(sae_dir), "subfolder": subfolder, "architecture": sae.cfg.architecture,
        "d_in": sae.d_in, "d_sae": sae.d_sae, "k": getattr(sae.cfg.options, "k", None), "model": name,
        "hook_name": sae.cfg.metadata.hook_name, "dataset": dataset, "seed": seed,
        **({"hook_name_out": spliced_hooks_of(sae, None, hook_out)[1],
            "skip_connection": sae.cfg.skip_connection} if sae.cfg.transcoder else {}),
        **{k: _finite_or_none(v) for k, v in metrics.items()},
        "dead_latents": int((frequency < DEAD_FREQUENCY).sum()),
        "dense_latents": int((frequency > DENSE_FREQUENCY).sum()),
        "dead_frequency": DEAD_FREQUENCY, "dense_frequency": DENSE_FREQUENCY,
        "density_plot": plot.name, "saekit_version": __version__,
    }
    write_json(out, report)
    return report
