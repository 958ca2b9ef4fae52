"""Text data sets: Anthropic hh-rlhf, Reddit TL;DR, and the quickstart set the project ships."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Literal

from ric.data import ExampleSource, JsonlExamples, read_jsonl

ASSISTANT = "\n\nAssistant:"
ASSETS = Path(__file__).resolve().parent / "assets"


def split_dialogue(text: str) -> tuple[str, str]:
    """``(prompt, response)`` of an hh-rlhf dialogue: the prompt is everything before the last
    ``"\\n\\nAssistant:"`` (the task template adds it back), the response what follows it."""
    if ASSISTANT not in text:
        raise ValueError(f"dialogue has no {ASSISTANT!r} turn: {text[:120]!r}")
    prompt, response = text.rsplit(ASSISTANT, 1)
    return prompt, response.strip()


def local(path: str, suffixes: tuple[str, ...]) -> None:
    """A path that names a local file (by its suffix, or a folder prefix) must exist: checked when the config
    is read, not after the model has loaded. Hub names (``owner/name``) pass."""
    p = Path(path)
    if (p.suffix in suffixes or path.startswith((".", "/", "~"))) and not p.expanduser().exists():
        raise FileNotFoundError(f"data file not found: {path}")


def _hub(name: str, **kwargs: Any):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading {name!r} from the hub needs the 'datasets' package (pip install datasets)"
        ) from None
    return datasets.load_dataset(name, **kwargs)


class HHRLHF(ExampleSource):
    """Anthropic hh-rlhf: both the chosen and the rejected response of each dialogue (RiC uses both).

    Args:
        path: a local ``.jsonl`` / ``.jsonl.gz`` with ``chosen`` and ``rejected`` fields, or a hub name
            (``Anthropic/hh-rlhf``, needs the ``datasets`` package and network).
        split: hub split.
        data_dir: hub subset, e.g. ``harmless-base``.
        responses: ``both``, ``chosen`` or ``rejected``.
        every_nth: keep every n-th dialogue (the paper evaluates on every 4th test sample).
        limit: keep at most this many dialogues.
    """

    def __init__(
        self,
        path: str = "Anthropic/hh-rlhf",
        split: str = "train",
        data_dir: str | None = None,
        responses: Literal["both", "chosen", "rejected"] = "both",
        every_nth: int = 1,
        limit: int | None = None,
    ) -> None:
        if responses not in ("both", "chosen", "rejected"):
            raise ValueError(f"responses must be 'both', 'chosen' or 'rejected', got {responses!r}")
        if every_nth < 1:
            raise ValueError(f"every_nth must be >= 1, got {every_nth}")
        local(path, (".jsonl", ".gz", ".json"))
        self.path, self.split, self.data_dir = path, split, data_dir
        self.responses, self.every_nth, self.limit = responses, every_nth, limit

    def _dialogues(self) -> list[dict[str, Any]]:
        p = Path(self.path)
        if p.suffix in (".jsonl", ".gz", ".json") or p.exists():
            return read_jsonl(p)
        if "/" not in self.path:
            raise FileNotFoundError(f"hh-rlhf data not found: {self.path}")
        return list(_hub(self.path, split=self.split, data_dir=self.data_dir))

    def load(self) -> list[dict[str, Any]]:
        rows = self._dialogues()[:: self.every_nth]
        if self.limit:
            rows = rows[: self.limit]
        keys = ["chosen", "rejected"] if self.responses == "both" else [self.responses]
        out = []
        for i, row in enumerate(rows):
            for key in keys:
                if key not in row:
                    raise ValueError(f"{self.path}: record {i} lacks {key!r}")
                prompt, response = split_dialogue(row[key])
                if response:
                    out.append({"prompt": prompt, "response": response})
        return out


def tldr_post(query: str) -> str:
    """The post of an OpenAI TL;DR query (``SUBREDDIT: ... TITLE: ... POST: ... TL;DR:``)."""
    body = query.split("POST:", 1)[1] if "POST:" in query else query
    if "TL;DR:" in body:
        body = body.rsplit("TL;DR:", 1)[0]
    return " ".join(body.split())


class RedditTLDR(ExampleSource):
    """Reddit TL;DR posts with summaries. The prompt is the post (newlines collapsed, as the authors did).

    Args:
        path: a local CSV (``query`` plus summary columns, the OpenAI format), a JSONL with ``post`` and
            ``summary`` fields, or the hub name ``openai/summarize_from_feedback`` (comparisons).
        summary_columns: CSV columns holding summaries; each becomes one example.
        limit: keep at most this many posts.
    """

    def __init__(
        self,
        path: str = "openai/summarize_from_feedback",
        summary_columns: tuple[str, ...] = ("reference_responses", "postprocessed_response"),
        split: str = "train",
        limit: int | None = None,
    ) -> None:
        local(path, (".csv", ".jsonl", ".gz"))
        self.path, self.summary_columns, self.split, self.limit = path, tuple(summary_columns), split, limit

    def load(self) -> list[dict[str, Any]]:
        p = Path(self.path)
        out: list[dict[str, Any]] = []
        if p.suffix == ".csv":
            if not p.is_file():
                raise FileNotFoundError(f"TL;DR data file not found: {p}")
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            with p.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                missing = [c for c in ("query", *self.summary_columns) if c not in (reader.fieldnames or [])]
                if missing:
                    raise ValueError(f"{p}: missing columns {missing}; has {reader.fieldnames}")
                for k, row in enumerate(reader):
                    if self.limit and k >= self.limit:
                        break
                    post = tldr_post(row["query"])
                    for col in self.summary_columns:
                        summary = " ".join(row[col].split())
                        if summary:
                            out.append({"prompt": post, "response": summary})
            return out
        if p.suffix in (".jsonl", ".gz") or p.exists():
            rows = read_jsonl(p)[: self.limit] if self.limit else read_jsonl(p)
            for i, row in enumerate(rows):
                if "post" not in row or "summary" not in row:
                    raise ValueError(f"{p}: record {i} lacks 'post' or 'summary'")
                out.append({"prompt": " ".join(row["post"].split()), "response": " ".join(row["summary"].split())})
            return out
        data = _hub(self.path, name="comparisons", split=self.split)
        seen = 0
        for row in data:
            post = row["info"].get("post")
            if not post:
                continue
            for s in row["summaries"]:
                out.append({"prompt": " ".join(post.split()), "response": " ".join(s["text"].split())})
            seen += 1
            if self.limit and seen >= self.limit:
                break
        return out


class Quickstart(JsonlExamples):
    """The project's own CPU-sized set: 160 everyday questions we wrote, each with four responses
    bootstrapped from SmolLM2-135M-Instruct under four hidden style instructions (from one simple sentence
    to a long formal answer), so length and readability vary per prompt. Regenerate with
    ``scripts/bootstrap_quickstart_data.py``."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__(str(ASSETS / "quickstart.jsonl"), limit=limit)

    def identity(self) -> str:
        return f"{type(self).__module__}.Quickstart(limit={self.limit!r})"
