"""Steer a model through SAE latents ("Golden Gate" style); ``saekit.generation`` samples under it.

At each steered position of a hook, with ``x`` the activation there::

    acts  = sae.encode(x)
    error = x - sae.decode(acts)            # the SAE's error term is kept
    acts' = acts with: clamp (acts[f] = v) and ablate (acts[f] = 0), then add (acts[f] += v)
    out   = sae.decode(acts') + error

so ``out = x + (acts' - acts) @ W_dec`` up to float rounding. A transcoder encodes the
activation at its input hook and edits the one at its output hook (``metadata.hook_name_out``):
there ``x`` above is the output hook's activation and ``acts`` the latents of the input's. Positions where no edit applies
(BOS, the prompt under ``positions="generated"``) are returned exactly as they were, so an empty
steering context leaves the logits bit-identical.

Positions are absolute indices in the sequence, read off the Hugging Face model's inputs by a
forward pre-hook: a pass that continues a KV cache (as ``model.generate`` does after its first
step) starts at the cache's length, any other pass at 0.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from saekit.errors import SaekitError
from saekit.sae import SAE
from saekit.model import check_hooks

Positions = Literal["all", "generated"]
POSITIONS = ("all", "generated")
RESID_HOOK_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


class SteeringError(SaekitError, ValueError):
    """A steering request saekit cannot carry out: bad feature, value, hook or SAE."""


@dataclass
class Intervention:
    """Edits to one SAE's latents at one hook (default: the SAE's ``metadata.hook_name``; a
    transcoder's ``metadata.hook_name_out``, its latents read at ``metadata.hook_name``).

    ``clamp`` {feature: value} sets latents, ``ablate`` [feature, ...] sets them to 0, and then
    ``add`` {feature: value} adds to them (so clamp 5 and add 2 on one feature gives 7).
    Values are in the SAE's activation units.
    """

    sae: SAE
    clamp: Mapping[int, float] = field(default_factory=dict)
    add: Mapping[int, float] = field(default_factory=dict)
    ablate: Sequence[int] = ()
    hook: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sae, SAE):
            raise SteeringError(f"Intervention needs a saekit SAE, got {type(self.sae).__name__}.")
        self.clamp = {self._feature(f): self._value(v, "clamp") for f, v in
                      _mapping(self.clamp, "clamp").items()}
        self.add = {self._feature(f): self._value(v, "add") for f, v in
                    _mapping(self.add, "add").items()}
        if isinstance(self.ablate, (int, str)):
            self.ablate = [self.ablate]
        self.ablate = sorted({self._feature(f) for f in self.ablate})
        both = sorted(set(self.clamp) & set(self.ablate))
        if both:
            raise SteeringError(f"Features {both} are both clamped and ablated; pick one.")

    @property
    def hook_name(self) -> str:
        """The hook whose activations are edited."""
        metadata = self.sae.cfg.metadata
        name = self.hook or (metadata.hook_name_out if self.sae.cfg.transcoder
                             else metadata.hook_name)
        if not name:
            raise SteeringError("The SAE's metadata names no hook_name (a transcoder's: no "
                                "hook_name_out): pass hook='blocks.6.hook_resid_post' (or the "
                                "hook it was trained to reconstruct).")
        return name

    @property
    def input_hook(self) -> str | None:
        """A transcoder's input hook, where its latents are read; None for an SAE."""
        if not self.sae.cfg.transcoder:
            return None
        if not self.sae.cfg.metadata.hook_name:
            raise SteeringError("The transcoder's metadata names no input hook_name; set "
                                "sae.cfg.metadata.hook_name.")
        return self.sae.cfg.metadata.hook_name

    @property
    def is_empty(self) -> bool:
        return not (self.clamp or self.add or self.ablate)

    @property
    def width(self) -> int:
        return self.sae.d_out

    def check(self, model) -> None:
        """Raise if a hook is not in ``model`` or a residual hook's width is not the SAE's."""
        what = "The transcoder writes d_out =" if self.input_hook else "The SAE takes d_in ="
        check_hook_width(model, self.hook_name, self.sae.d_out, what)
        if self.input_hook:
            check_hook_width(model, self.input_hook, self.sae.d_in, "The transcoder takes d_in =")

    def apply(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        """Steered ``x`` [n, d_out]: the edited latents decoded, plus the SAE's error term; a
        transcoder's latents come from ``source`` [n, d_in], its input hook's activations."""
        sae = self.sae
        x_sae = x.to(sae.W_dec.device, sae.W_dec.dtype)
        if sae.cfg.transcoder and source is None:
            raise SteeringError("A transcoder's edit needs its input hook's activations "
                                "(source=).")
        latents = sae.encode(x_sae if source is None else
                             source.to(sae.W_dec.device, sae.W_dec.dtype))
        error = x_sae - sae.decode(latents)
        return (sae.decode(self.edit(latents)) + error).to(x.device, x.dtype)

    def edit(self, acts: Tensor) -> Tensor:
        """``acts`` [..., d_sae] with clamp and ablate set, then add applied (a new tensor)."""
        acts = acts.clone()
        if self.clamp:
            acts[..., list(self.clamp)] = acts.new_tensor(list(self.clamp.values()))
        if self.ablate:
            acts[..., self.ablate] = 0
        if self.add:
            acts[..., list(self.add)] += acts.new_tensor(list(self.add.values()))
        return acts

    def _feature(self, feature: Any) -> int:
        if isinstance(feature, bool):
            raise SteeringError(f"Feature indices are integers, got {feature!r}.")
        try:
            index = operator.index(feature)
        except TypeError:
            raise SteeringError(f"Feature indices are integers, got {feature!r}.") from None
        if not 0 <= index < self.sae.d_sae:
            raise SteeringError(f"Feature {index} is out of range: this SAE has d_sae = "
                                f"{self.sae.d_sae} latents (0 to {self.sae.d_sae - 1}).")
        return index

    @staticmethod
    def _value(value: Any, what: str) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SteeringError(f"{what} values are numbers, got {value!r}.") from None
        if not math.isfinite(value):
            raise SteeringError(f"{what} values must be finite, got {value}.")
        return value


@dataclass
class SteeringVector:
    """Adds ``scale * vector`` [d_model] to the activations at ``hook``: steering without an SAE
    (e.g. a ``mean_difference_direction``), the baseline SAE-feature steering is measured
    against. It takes the same ``positions`` as SAE interventions."""

    vector: Tensor
    hook: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor) or self.vector.ndim != 1:
            raise SteeringError("SteeringVector.vector must be a 1-D tensor [d_model], got "
                                f"{getattr(self.vector, 'shape', type(self.vector).__name__)}.")
        if not bool(torch.isfinite(self.vector).all()):
            raise SteeringError("SteeringVector.vector holds NaN or inf values.")
        self.scale = Intervention._value(self.scale, "scale")

    @property
    def hook_name(self) -> str:
        return self.hook

    input_hook = None  # reads no other hook

    @property
    def width(self) -> int:
        return self.vector.shape[0]

    @property
    def is_empty(self) -> bool:
        return self.scale == 0 or not bool(self.vector.any())

    def check(self, model) -> None:
        """Raise if the hook is not in ``model`` or a residual hook's width is not the vector's."""
        check_hook_width(model, self.hook, self.width, "The steering vector has width")

    def apply(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        """``x`` [n, d_model] + scale * vector (``source`` unused)."""
        return x + (self.scale * self.vector).to(x.device, x.dtype)


@dataclass
class OnRows:
    """``intervention`` applied to batch rows ``start:stop`` only, so that several steering
    settings can be generated or scored in one batch (one block of rows each)."""

    intervention: Intervention | SteeringVector
    start: int
    stop: int

    @property
    def hook_name(self) -> str:
        return self.intervention.hook_name

    @property
    def input_hook(self) -> str | None:
        return self.intervention.input_hook

    @property
    def width(self) -> int:
        return self.intervention.width

    @property
    def is_empty(self) -> bool:
        return self.intervention.is_empty or self.stop <= self.start

    def check(self, model) -> None:
        self.intervention.check(model)

    def apply(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        return self.intervention.apply(x, source)

    def rows(self, act: Tensor) -> Tensor:
        """Bool [batch] of the rows this applies to."""
        index = torch.arange(act.shape[0], device=act.device)
        return (index >= self.start) & (index < self.stop)


def check_hook_width(model, hook: str, width: int, what: str) -> None:
    """Raise if ``hook`` is not in ``model``, or is a residual hook whose width is not ``width``."""

    check_hooks(model, [hook])
    d_model = getattr(model.cfg, "d_model", None)
    if hook.endswith(RESID_HOOK_SUFFIXES) and d_model not in (None, width):
        raise SteeringError(f"{what} {width}, but {hook!r} has width d_model = {d_model}: use "
                            "one made for this model.")


def _mapping(edits: Any, what: str) -> Mapping:
    if edits is None:
        return {}
    if not isinstance(edits, Mapping):
        raise SteeringError(f"{what} takes a dict {{feature: value}}, got {type(edits).__name__}.")
    return edits


class PositionTracker:
    """Which positions of each forward pass to steer; fed by a pre-hook on the HF model.

    ``"all"``: every position, except position 0 and BOS tokens when ``skip_bos``.
    ``"generated"``: positions whose absolute index is >= the prompt length. The prompt is the
    input of the first pass that does not continue a KV cache; a later such pass that extends it
    (generation without KV cache, or re-scoring prompt + continuation) keeps it, any other pass
    becomes the new prompt, so a plain forward over a new text steers nothing.
    """

    def __init__(self, positions: Positions, skip_bos: bool, bos_token_id: int | None) -> None:
        self.positions, self.skip_bos, self.bos_token_id = positions, skip_bos, bos_token_id
        self.offset = 0
        self.ids: Tensor | None = None
        self.prompt: Tensor | None = None
        self.prompt_length = 0

    def observe(self, module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (``with_kwargs=True``) on the Hugging Face model."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None
        cache, cache_position = kwargs.get("past_key_values"), kwargs.get("cache_position")
        if isinstance(cache_position, Tensor) and cache_position.numel():
            self.offset = int(cache_position.reshape(-1)[0])
        elif cache is not None and hasattr(cache, "get_seq_length"):
            self.offset = int(cache.get_seq_length())
        else:
            self.offset = 0
        if self.offset == 0 and self.positions == "generated":
            self._update_prompt(ids)

    def _update_prompt(self, ids: Any) -> None:
        if not isinstance(ids, Tensor):
            return
        old = self.prompt
        extends = (old is not None and ids.ndim == old.ndim == 2 and ids.shape[0] == old.shape[0]
                   and ids.shape[1] >= old.shape[1]
                   and torch.equal(ids[:, :old.shape[1]], old.to(ids.device)))
        if not extends:
            self.prompt = ids.detach().clone()
            self.prompt_length = ids.shape[1]

    def mask(self, act: Tensor) -> Tensor | None:
        """Bool [batch, pos] of positions to steer in ``act`` [batch, pos, ...]; None if none."""
        batch, length = act.shape[:2]
        index = torch.arange(self.offset, self.offset + length, device=act.device)
        keep = torch.ones(batch, length, dtype=torch.bool, device=act.device)
        if self.skip_bos:
            keep &= index != 0
            ids = self.ids
            if ids is not None and self.bos_token_id is not None and ids.shape == (batch, length):
                keep &= ids.to(act.device) != self.bos_token_id
        if self.positions == "generated":
            keep &= index >= self.prompt_length
        return keep if bool(keep.any()) else None


def make_hooks(intervention: Intervention | SteeringVector | OnRows,
               tracker: PositionTracker) -> list[tuple[str, Any]]:
    """The forward hooks ``(name, fn(act [batch, pos, ..., width], hook) -> act)`` applying the
    edits at the positions ``tracker`` selects (the others are returned as they were); for a
    transcoder, first a hook that holds its input hook's activations for the edit."""
    held: dict[str, Tensor] = {}

    def hold_input(act: Tensor, hook) -> Tensor:
        held["x"] = act
        return act

    def steer_hook(act: Tensor, hook) -> Tensor:
        if act.ndim < 3 or act.shape[-1] != intervention.width:
            raise SteeringError(f"The intervention takes width {intervention.width}, but hook "
                                f"{intervention.hook_name!r} gives activations of shape "
                                f"{tuple(act.shape)}.")
        mask = tracker.mask(act)
        if mask is not None and isinstance(intervention, OnRows):
            mask = mask & intervention.rows(act)[:, None]
        if mask is None or not bool(mask.any()):
            return act
        out = act.clone()
        source = held.pop("x")[mask] if intervention.input_hook else None
        out[mask] = intervention.apply(act[mask], source)
        return out

    steering = [(intervention.hook_name, steer_hook)]
    return [(intervention.input_hook, hold_input), *steering] if intervention.input_hook \
        else steering


def interventions_from(items: Sequence[Any], clamp: Mapping[int, float] | None = None,
                       add: Mapping[int, float] | None = None, ablate: Sequence[int] | None = None,
                       hook: str | None = None) -> list[Intervention | SteeringVector]:
    """Normalise ``steer``'s positional arguments into a list of interventions.

    Items: ``Intervention``, ``SteeringVector``, ``(sae, {"clamp": ..., "add": ..., "ablate": ..., "hook": ...})``,
    a bare ``SAE`` (which takes the keyword edits; at most one), or a list of these.
    """
    flat: list[Any] = []
    for item in items:
        if isinstance(item, list) or (isinstance(item, tuple) and not _is_pair(item)):
            flat.extend(item)
        else:
            flat.append(item)
    bare = [item for item in flat if isinstance(item, SAE)]
    keywords = any(v is not None for v in (clamp, add, ablate, hook))
    if len(bare) > 1 or (keywords and not bare):
        raise SteeringError("clamp=/add=/ablate=/hook= apply to one bare SAE: pass exactly one "
                            "SAE with them, or Intervention(sae, clamp=...) objects.")
    out = []
    for item in flat:
        if isinstance(item, (Intervention, SteeringVector, OnRows)):
            out.append(item)
        elif isinstance(item, SAE):
            out.append(Intervention(item, clamp or {}, add or {}, ablate or (), hook))
        elif _is_pair(item):
            sae, edits = item
            unknown = set(edits) - {"clamp", "add", "ablate", "hook"}
            if unknown:
                raise SteeringError(f"Unknown edit keys {sorted(unknown)}: use clamp, add, "
                                    "ablate, hook.")
            out.append(Intervention(sae, **edits))
        else:
            raise SteeringError(f"steer takes SAEs, Interventions, SteeringVectors or (sae, "
                                f"edits) pairs, got "
                                f"{type(item).__name__}.")
    return out


def _is_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], SAE) \
        and isinstance(item[1], Mapping)


@contextmanager
def steer(model, *interventions: Any, clamp: Mapping[int, float] | None = None,
          add: Mapping[int, float] | None = None, ablate: Sequence[int] | None = None,
          hook: str | None = None, positions: Positions = "all",
          skip_bos: bool = True) -> Iterator[Any]:
    """Steer ``model`` (a ``TransformerBridge``) through SAE latents while the context is open.

    ``with steer(model, sae, clamp={f: 8.0}):`` or ``with steer(model, Intervention(sae1, ...),
    (sae2, {"ablate": [3]}), SteeringVector(v, "blocks.6.hook_resid_post"),
    positions="generated"):``. Forward passes, ``run_with_cache`` and
    ``model.generate`` inside are steered; several interventions on one hook apply in order.
    Edits (see the module docstring): clamp and ablate set latents, add is applied after them.
    ``positions``: ``"all"`` steers every position except position 0 / BOS tokens (when
    ``skip_bos``; BOS carries huge activations and steering it wrecks generation);
    ``"generated"`` steers only positions whose index is >= the prompt length (see
    ``PositionTracker``). Hooks are removed on exit, also on an exception. Yields the model.
    """
    if positions not in POSITIONS:
        raise SteeringError(f"positions must be one of {POSITIONS}, got {positions!r}.")
    plan = interventions_from(interventions, clamp, add, ablate, hook)
    for intervention in plan:
        intervention.check(model)
    active = [iv for iv in plan if not iv.is_empty]
    tokenizer = getattr(model, "tokenizer", None)
    tracker = PositionTracker(positions, skip_bos, getattr(tokenizer, "bos_token_id", None))
    handle = None
    if active:
        handle = model.original_model.register_forward_pre_hook(tracker.observe, with_kwargs=True)
    try:
        with model.hooks(fwd_hooks=[hook for iv in active for hook in make_hooks(iv, tracker)]):
            yield model
    finally:
        if handle is not None:
            handle.remove()
