"""Capture: run a model over a corpus with hooks and write the activations to a cache.

One pass records every requested hook; the forward pass stops after the deepest
hooked block, so the unembedding is never computed. Shards are written atomically
and listed in the manifest only once complete, so a capture killed at any moment
resumes, when the same command runs again, from the last complete shard.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from saekit import __version__
from saekit.cache import check_shard, read_manifest, shard_name
from saekit.corpus import DEFAULT_CORPUS, load_corpus, pack_token_rows
from saekit.config import check_fields, setting
from saekit.errors import CacheMismatchError, ConfigError, CorruptCacheError
from saekit.files import LOCK_FILE, TMP_MARK, output_lock, sha256_file, write_json, write_safetensors
from saekit.manifest import MANIFEST, TOKENS_FILE, CacheManifest, ShardEntry
from saekit.model import DEFAULT_MODEL, check_hooks, load_model

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ModelReading:
    """Which model reads which corpus, and how: the settings ``saekit cache`` and on-the-fly
    ``saekit train`` share."""

    model: str = setting(DEFAULT_MODEL, "model to read: the embedded default, an HF id or a "
                         "local folder")
    dataset: str = setting(DEFAULT_CORPUS, "corpus: 'default' (offline), a local .txt/.jsonl/"
                           ".parquet file or folder, or an HF dataset name")
    context: int = setting(128, "tokens per row", ge=2)
    batch_rows: int = setting(16, "rows per forward pass", ge=1)
    model_dtype: str = setting("float32", "dtype of the model's forward pass (bfloat16: faster "
                               "on GPUs and CPUs with avx512_bf16; activations are still "
                               "kept in float32, or a cache's --dtype)",
                               choices=sorted(MODEL_DTYPES))
    text_field: str = setting("text", "text column of a .jsonl/.parquet/HF dataset")

    def check_reading(self) -> None:
        if not self.text_field.strip():
            raise ConfigError("--text-field is empty: name the text column of the dataset "
                              "(default: text).")


@dataclass
class CaptureConfig(ModelReading):
    """What to capture. The CLI's ``saekit cache`` flags are these fields."""

    hooks: list[str] = setting(["blocks.6.hook_resid_post"], "hook(s) to record, e.g. "
                               "blocks.6.hook_resid_post", flag="hook")
    tokens: int = setting(1_000_000, "tokens to capture (whole rows of --context)", ge=1)
    shard_rows: int = setting(512, "rows per shard file (rounded to --batch-rows)", ge=1)
    dtype: str = setting("float32", "storage dtype of the activations",
                         choices=sorted(STORAGE_DTYPES))
    seed: int = setting(0, "seed of the corpus shuffle")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tokens < self.context:
            raise ConfigError(f"--tokens must be >= --context; got --tokens {self.tokens}, "
                              f"--context {self.context}.")
        if not self.hooks:
            raise ConfigError("Name at least one hook, e.g. blocks.6.hook_resid_post.")
        self.hooks = list(dict.fromkeys(self.hooks))  # a hook named twice is captured once
        self.check_reading()
        self.shard_rows = max(self.batch_rows,
                              self.shard_rows // self.batch_rows * self.batch_rows)

    @property
    def n_rows(self) -> int:
        return self.tokens // self.context


def cache_settings(manifest: CacheManifest) -> dict:
    """The capture settings a cache was made with; settings added since it was made read as
    their value then (``model_dtype`` float32), so older caches still resume and match."""
    return {"model_dtype": "float32", **manifest.settings}


def check_model(model, config: ModelReading, hooks: list[str]) -> int | None:
    """Check ``model`` runs in ``config.model_dtype``, has ``hooks`` and a context of at least
    ``config.context``; the layer its forward can stop at after the deepest hook."""
    check_model_dtype(model, config)
    stop_at_layer = check_hooks(model, hooks)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and config.context > n_ctx:
        raise ConfigError(f"--context {config.context} is longer than {config.model}'s maximum "
                          f"context of {n_ctx} tokens; give --context <= {n_ctx}.")
    check_hook_shapes(model, hooks, stop_at_layer)
    return stop_at_layer


@torch.inference_mode()
def check_hook_shapes(model, hooks: list[str], stop_at_layer: int | None) -> None:
    """Raise ``ConfigError`` for a hook whose activations are not ``[batch, seq, d_model]``
    (e.g. an MLP's hidden layer or per-head attention), found on a two-token forward."""
    shapes = {}

    def record(act: torch.Tensor, hook, name: str = "") -> torch.Tensor:
        shapes[name] = tuple(act.shape)
        return act

    bos = model.tokenizer.bos_token_id
    probe = torch.full((1, 2), bos, dtype=torch.long, device=next(model.parameters()).device)
    model.run_with_hooks(probe, fwd_hooks=[(h, lambda act, hook, h=h: record(act, hook, h))
                                           for h in hooks], stop_at_layer=stop_at_layer)
    d_model = int(model.cfg.d_model)
    for hook in hooks:
        if shapes.get(hook, (1, 2, d_model)) != (1, 2, d_model):
            raise ConfigError(
                f"--hook {hook} gives activations shaped {list(shapes[hook])} for a [1, 2] "
                f"input, not [batch, seq, d_model = {d_model}]: saekit captures and trains on "
                "hooks shaped like the residual stream (blocks.N.hook_resid_pre/mid/post, "
                "hook_attn_out, hook_mlp_out; `saekit hooks` lists the model's hooks).")


def corpus_rows(config: ModelReading, tokenizer, n_rows: int, seed: int) -> torch.Tensor:
    """The first ``n_rows`` rows ``[n_rows, context]`` of ``config.dataset`` shuffled by
    ``seed`` and packed (fewer if the corpus runs out)."""
    documents = load_corpus(config.dataset, seed=seed, text_field=config.text_field)
    return pack_token_rows(documents, tokenizer, n_rows, config.context)


def check_model_dtype(model, config: ModelReading) -> None:
    """Raise ``ConfigError`` when ``model`` does not run in ``--model-dtype`` (a model passed
    in), or its device cannot compute in bfloat16."""
    parameter = next(model.parameters())
    if parameter.dtype != MODEL_DTYPES[config.model_dtype]:
        raise ConfigError(f"--model-dtype {config.model_dtype}, but the model given runs in "
                          f"{str(parameter.dtype).removeprefix('torch.')}: load it with "
                          f"load_model(..., dtype=torch.{config.model_dtype}).")
    if (config.model_dtype == "bfloat16" and parameter.device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise ConfigError(f"--model-dtype bfloat16: {torch.cuda.get_device_name(parameter.device)}"
                          " cannot compute in bfloat16; use --model-dtype float32.")


def prepare_out_folder(out: Path, settings: dict) -> CacheManifest | None:
    """Check ``out`` for a resumable cache; return its manifest (None if starting afresh)."""
    if not out.exists():
        return None
    if not (out / MANIFEST).exists():
        ours = re.compile(rf"^(shard_\d+\.safetensors|{TOKENS_FILE})({re.escape(TMP_MARK)}.*)?$"
                          rf"|^{re.escape(LOCK_FILE)}$")
        foreign = [p.name for p in out.iterdir() if not ours.match(p.name)]
        if foreign:
            raise CacheMismatchError(
                f"--out {out} already holds files that are not an activation cache "
                f"({', '.join(sorted(foreign)[:5])}). Pass an empty or new folder."
            )
        return None
    manifest = read_manifest(out)
    made_with = cache_settings(manifest)
    if made_with != settings:
        differ = {k: (made_with.get(k), v) for k, v in settings.items() if made_with.get(k) != v}
        listed = "; ".join(f"{k}: cache has {old!r}, asked {new!r}" for k, (old, new)
                           in differ.items())
        raise CacheMismatchError(
            f"--out {out} holds a cache made with other settings ({listed}). Use another "
            "--out, or delete that folder to capture afresh."
        )
    tokens_file = out / TOKENS_FILE
    if not tokens_file.exists() or sha256_file(tokens_file) != manifest.tokens_sha256:
        raise CorruptCacheError(
            f"{tokens_file} is missing or does not match its manifest checksum. Delete {out} "
            "to capture afresh."
        )
    for leftover in out.glob(f"*{TMP_MARK}*"):
        leftover.unlink()
    kept = []
    for entry in manifest.shards:
        try:
            check_shard(out, entry, verify_checksum=True)
        except CorruptCacheError as err:
            tqdm.write(f"saekit: {err} Recapturing from there.")
            break
        kept.append(entry)
    manifest.complete = manifest.complete and len(kept) == len(manifest.shards)
    manifest.shards = kept
    return manifest


def shards_intact(out: Path, manifest: CacheManifest) -> bool:
    """Whether every listed shard is there at its listed size (a damaged one is recaptured
    by the locked path, which checks hashes too)."""
    try:
        for entry in manifest.shards:
            check_shard(out, entry, verify_checksum=False)
    except CorruptCacheError:
        return False
    return True


def new_manifest(config: CaptureConfig, model, tokens: torch.Tensor, out: Path
                 ) -> CacheManifest:
    """Write the token rows ``[n_rows, context]`` and return the empty cache's manifest."""
    write_safetensors(out / TOKENS_FILE, {"tokens": tokens.to(torch.int32)})
    return CacheManifest(
        settings=asdict(config), model=config.model, hooks=list(config.hooks),
        d_model=int(model.cfg.d_model), n_layers=int(model.cfg.n_layers), dtype=config.dtype,
        context=config.context, n_rows=int(tokens.shape[0]), n_tokens=int(tokens.numel()),
        shard_rows=config.shard_rows, bos_token_id=int(model.tokenizer.bos_token_id),
        tokens_sha256=sha256_file(out / TOKENS_FILE), saekit_version=__version__)


@torch.inference_mode()
def capture_shard(model, rows: torch.Tensor, hooks: list[str], stop_at_layer: int | None,
                  batch_rows: int, dtype: torch.dtype, progress: tqdm | None = None,
                  out_device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Activations of ``rows`` ``[n, context]`` at each hook: ``{hook: [n, context, d_model]}``
    on ``out_device``."""
    n, context = rows.shape
    out = {h: torch.empty(n, context, model.cfg.d_model, dtype=dtype, device=out_device)
           for h in hooks}
    device = next(model.parameters()).device
    for start in range(0, n, batch_rows):
        batch = rows[start:start + batch_rows].to(device)

        def record(act: torch.Tensor, hook, name: str = "", begin: int = start) -> torch.Tensor:
            out[name][begin:begin + len(act)].copy_(act)
            return act

        fwd_hooks = [(h, lambda act, hook, h=h: record(act, hook, h)) for h in hooks]
        model.run_with_hooks(batch, fwd_hooks=fwd_hooks, stop_at_layer=stop_at_layer)
        if progress is not None:
            progress.update(batch.numel())
    return out


def write_shard(path: Path, acts: dict[str, torch.Tensor], start: int, end: int
                ) -> tuple[ShardEntry, int]:
    """Write one shard atomically; its manifest entry and the row it ends at."""
    write_safetensors(path, acts)
    return ShardEntry(path.name, (start, end), path.stat().st_size, sha256_file(path)), end


def record_shard(out: Path, manifest: CacheManifest, entry: ShardEntry, end: int, n_rows: int
                 ) -> None:
    """List a written shard in the manifest (rewritten atomically)."""
    manifest.shards.append(entry)
    manifest.complete = end == n_rows
    write_json(out / MANIFEST, manifest.to_dict())


def capture_activations(config: CaptureConfig, out: str | Path, model=None,
                        device: str | torch.device | None = None) -> Path:
    """Capture ``config.hooks`` over ``config.dataset`` into the cache folder ``out``.

    Resumes a cache with the same settings; raises ``CacheMismatchError`` for one
    made with other settings, ``FolderInUseError`` while another run writes there. Pass
    ``model`` to reuse a loaded ``TransformerBridge``.
    """
    out = Path(out)
    if (out / MANIFEST).is_file():  # a finished cache is only read: no lock, no write access
        manifest = read_manifest(out)
        if (manifest.complete and cache_settings(manifest) == asdict(config)
                and shards_intact(out, manifest)):
            return out
    with output_lock(out, "cache") as out:
        return _capture_into(config, out, model, device)


def _capture_into(config: CaptureConfig, out: Path, model, device) -> Path:
    settings = asdict(config)
    manifest = prepare_out_folder(out, settings)
    if manifest is not None and manifest.complete:
        return out
    if model is None:
        model = load_model(config.model, device=device, dtype=MODEL_DTYPES[config.model_dtype])
    stop_at_layer = check_model(model, config, config.hooks)
    if manifest is None:
        tokens = corpus_rows(config, model.tokenizer, config.n_rows, config.seed)
        out.mkdir(parents=True, exist_ok=True)
        manifest = new_manifest(config, model, tokens, out)
        write_json(out / MANIFEST, manifest.to_dict())
    else:
        tokens = load_file(out / TOKENS_FILE)["tokens"].long()
    done, n_rows = manifest.rows_done, manifest.n_rows
    progress = tqdm(total=n_rows * config.context, initial=done * config.context, unit="tok",
                    unit_scale=True, desc=f"capture {', '.join(config.hooks)}")
    # Shard i is written and hashed on a worker thread while shard i + 1 is computed (file I/O
    # and hashing release the GIL); the manifest lists a shard only after its write finished.
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for start in range(done, n_rows, config.shard_rows):
            end = min(start + config.shard_rows, n_rows)
            acts = capture_shard(model, tokens[start:end], config.hooks, stop_at_layer,
                                 config.batch_rows, STORAGE_DTYPES[config.dtype], progress)
            if pending is not None:
                record_shard(out, manifest, *pending.result(), n_rows)
            index = len(manifest.shards)  # the shard before is recorded by now
            pending = writer.submit(write_shard, out / shard_name(index), acts, start, end)
        if pending is not None:
            record_shard(out, manifest, *pending.result(), n_rows)
    progress.close()
    return out
