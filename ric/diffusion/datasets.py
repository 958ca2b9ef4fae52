"""Image-caption data sets. Each record is ``{"prompt": caption, "response": image path}``: images stay on
disk, so scoring, the score cache and the online buffer only handle paths.

Sources: a folder with ``captions.jsonl``; parquet or webdataset (``.tar``) shards; an HF dataset name; and
:class:`Shapes`, procedurally drawn shapes with captions that describe them (the CPU quickstart's data).
Corrupt images are skipped with one counted warning, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ric.data import ExampleSource, read_jsonl

log = logging.getLogger(__name__)


def readable_image(path: str | Path) -> bool:
    """Whether the file decodes as an image (header check and a full decode)."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for broken files
        return False


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def keep_readable(records: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Drop records whose image is missing or corrupt, with one warning that counts them."""
    ok = [readable_image(r["response"]) for r in records]
    good = [r for r, k in zip(records, ok) if k]
    if len(good) < len(records):
        bad = [r["response"] for r, k in zip(records, ok) if not k][:3]
        log.warning("skipped %d of %d images in %s that are missing or corrupt (e.g. %s)",
                    len(records) - len(good), len(records), source, bad)  # fmt: skip
    for r in good:
        r["fingerprint"] = _fingerprint(Path(r["response"]))
    return good


def write_captions(folder: Path, lines: list[str]) -> None:
    """Write ``captions.jsonl`` last and atomically: its presence marks a folder as complete."""
    tmp = folder / "captions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(folder / "captions.jsonl")


class ImageFolder(ExampleSource):
    """A folder of images with captions: ``captions.jsonl`` lines ``{"file": "x.png", "caption": "..."}``, or
    the Hugging Face ``imagefolder`` convention, ``metadata.jsonl`` (or ``metadata.csv``) with a ``file_name``
    column and a text column (``text`` by default) beside images that may sit in subfolders.

    Args:
        path: the folder.
        captions: the captions file, relative to the folder; default: ``captions.jsonl`` if there is one,
            else ``metadata.jsonl`` or ``metadata.csv``.
        file_key, caption_key: field names in the captions file (defaults: ``file`` / ``caption`` for
            ``captions.jsonl``, ``file_name`` / ``text`` for the ``metadata`` files).
        limit: keep at most this many pairs.
    """

    def __init__(
        self,
        path: str,
        captions: str | None = None,
        file_key: str | None = None,
        caption_key: str | None = None,
        limit: int | None = None,
    ) -> None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"image folder not found: {path}")
        self.path = str(path)
        self.captions = captions or next(
            (n for n in ("captions.jsonl", "metadata.jsonl", "metadata.csv") if (Path(path) / n).is_file()),
            "captions.jsonl",
        )
        hf = self.captions.startswith("metadata.")
        self.file_key = file_key or ("file_name" if hf else "file")
        self.caption_key = caption_key or ("text" if hf else "caption")
        self.limit = limit

    def rows(self) -> list[dict[str, Any]]:
        index = Path(self.path) / self.captions
        if index.suffix == ".csv":
            if not index.is_file():
                raise FileNotFoundError(f"captions file not found: {index}")
            with index.open(newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        if not index.is_file():
            raise FileNotFoundError(
                f'{self.path} has no {self.captions}: give captions.jsonl ({{"file", "caption"}} lines) or the '
                'Hugging Face imagefolder metadata.jsonl ({"file_name", "text"} lines)'
            )
        return read_jsonl(index)

    def load(self) -> list[dict[str, Any]]:
        folder = Path(self.path)
        records = []
        for i, row in enumerate(self.rows()):
            if self.file_key not in row or self.caption_key not in row:
                raise ValueError(f"{folder / self.captions}: line {i + 1} lacks {self.file_key!r} or "
                                 f"{self.caption_key!r}: {row}")  # fmt: skip
            records.append({"prompt": str(row[self.caption_key]), "response": str(folder / row[self.file_key])})
        records = records[: self.limit] if self.limit else records
        return keep_readable(records, str(folder))


class _Materialized(ExampleSource):
    """Sources whose images arrive as bytes: written once to ``extract_dir`` so records can hold paths."""

    extract_dir: str | None
    limit: int | None

    def _target(self) -> Path:
        key = hashlib.sha256(self.identity().encode()).hexdigest()[:16]
        return Path(self.extract_dir or ".ric_cache/images") / key

    def pairs(self):
        """Yield ``(name, image bytes, caption)``."""
        raise NotImplementedError

    def load(self) -> list[dict[str, Any]]:
        folder = self._target()
        index = folder / "captions.jsonl"
        if not index.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            lines = []
            for k, (name, data, caption) in enumerate(self.pairs()):
                if self.limit and k >= self.limit:
                    break
                file = f"{k:07d}{Path(name).suffix or '.png'}"
                (folder / file).write_bytes(data)
                lines.append(json.dumps({"file": file, "caption": caption}))
            write_captions(folder, lines)
        return ImageFolder(str(folder), limit=self.limit).load()


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):  # HF / parquet image struct {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"expected image bytes, got {type(value).__name__}")
    return bytes(value)


class ImageShards(_Materialized):
    """Parquet files (an image column of bytes or ``{"bytes": ...}`` structs and a caption column) or
    webdataset ``.tar`` shards (``key.png``/``key.jpg`` beside ``key.txt`` or ``key.json`` with the caption).

    Args:
        paths: shard files (all parquet or all tar).
        image_key, caption_key: parquet columns / json field of the caption.
        extract_dir: where images are written once (default ``.ric_cache/images``).
        limit: keep at most this many pairs.
    """

    def __init__(
        self,
        paths: list[str],
        image_key: str = "image",
        caption_key: str = "caption",
        extract_dir: str | None = None,
        limit: int | None = None,
    ) -> None:
        if not paths:
            raise ValueError("ImageShards needs at least one shard path")
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"shard not found: {p}")
        self.paths = [str(p) for p in paths]
        self.image_key = image_key
        self.caption_key = caption_key
        self.extract_dir = extract_dir
        self.limit = limit

    def pairs(self):
        for shard in self.paths:
            if shard.endswith(".parquet"):
                import pyarrow.parquet as pq

                table = pq.read_table(shard, columns=[self.image_key, self.caption_key]).to_pylist()
                for i, row in enumerate(table):
                    yield f"{i}.png", _image_bytes(row[self.image_key]), str(row[self.caption_key])
            elif shard.endswith(".tar"):
                yield from self._tar_pairs(shard)
            else:
                raise ValueError(f"unknown shard type {shard!r}: expected .parquet or .tar")

    def _tar_pairs(self, shard: str):
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key in sorted(groups):
            parts = groups[key]
            image_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
            if image_ext is None:
                continue
            if "txt" in parts:
                caption = parts["txt"].decode("utf-8").strip()
            elif "json" in parts:
                caption = str(json.loads(parts["json"])[self.caption_key])
            else:
                continue
            yield f"{key}.{image_ext}", parts[image_ext], caption


class HFImageDataset(_Materialized):
    """An HF dataset with an image and a caption column (needs the ``datasets`` package and, for hub
    names, network access)."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        image_key: str = "image",
        caption_key: str = "caption",
        extract_dir: str | None = None,
        limit: int | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.image_key = image_key
        self.caption_key = caption_key
        self.extract_dir = extract_dir
        self.limit = limit

    def pairs(self):
        import datasets

        ds = datasets.load_dataset(self.name, split=self.split)
        for i, row in enumerate(ds):
            yield f"{i}.png", _image_bytes(row[self.image_key]), str(row[self.caption_key])


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 50, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
}
GREYS = {"white": (235, 235, 235), "grey": (128, 128, 128), "black": (25, 25, 25)}
SHAPE_KINDS = ("circle", "square", "triangle")


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def draw_shapes(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One procedurally drawn picture and a caption naming only its main shape and colour ("a red circle").

    Two hidden factors, drawn per picture, set both rewards and are left to the reward markers: how vivid
    the scene is (a two-colour background and small shapes, from grey to saturated) and how busy it is (up to
    20 small shapes, never blurred). Busy scenes tend to be vivid, so colourfulness conflicts with JPEG
    compressibility; and since both factors change the whole picture, a column of the sweep's grid shows them
    at a glance. No pixel noise: a small VAE cannot reproduce it, so the part of compressibility it carried
    could never be steered through the decoder."""
    s2 = size * 2  # drawn at twice the size, then downsampled: smooth edges
    vivid = rng.uniform()
    busy = 0.5 * vivid + 0.5 * rng.uniform()
    grey = np.array(GREYS[str(rng.choice(list(GREYS)))], dtype=np.float64)
    first, second = (np.array(COLOURS[str(c)], dtype=np.float64) for c in rng.choice(list(COLOURS), 2, replace=False))
    yy, xx = np.mgrid[0:s2, 0:s2]
    split = [xx < s2 / 2, yy < s2 / 2, xx + yy < s2][int(rng.integers(3))]
    pixels = np.where(split[..., None], first, second) * vivid + grey * (1 - vivid)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.binomial(20, busy)):
        r = s2 * rng.uniform(0.06, 0.12)
        fill = np.array(COLOURS[str(rng.choice(list(COLOURS)))]) * vivid + 128 * (1 - vivid)
        kind = str(rng.choice(SHAPE_KINDS))
        _draw(draw, kind, *rng.uniform(r, s2 - r, 2), r, tuple(int(v) for v in fill))
    colour, kind = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPE_KINDS))
    r = s2 * rng.uniform(0.25, 0.35)
    _draw(draw, kind, *rng.uniform(r, s2 - r, 2), r, COLOURS[colour])  # the main shape, drawn last
    if rng.random() < 0.2 * (1 - busy):
        img = img.filter(ImageFilter.GaussianBlur(radius=size / 16))
    return img.resize((size, size), Image.LANCZOS), f"a {colour} {kind}"


class Shapes(ExampleSource):
    """``count`` procedurally drawn shape pictures with captions, written once to ``folder`` (seeded, so
    every run and machine sees the same data).

    Args:
        count: number of pictures.
        size: their side in pixels.
        folder: where they are written (default ``.ric_cache/shapes-v<version>-<count>-<size>-<seed>``).
        seed: drawing seed.
    """

    #: bumped whenever the drawing changes, so cached pictures of an older drawing are never reused
    version = 4

    def __init__(self, count: int = 1200, size: int = 32, folder: str | None = None, seed: int = 0) -> None:
        if count < 1 or size < 8:
            raise ValueError(f"Shapes needs count >= 1 and size >= 8, got {count} and {size}")
        self.count = count
        self.size = size
        self.folder = folder
        self.seed = seed

    def write(self) -> Path:
        folder = Path(self.folder or f".ric_cache/shapes-v{self.version}-{self.count}-{self.size}-{self.seed}")
        if (folder / "captions.jsonl").is_file():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(self.seed)
        lines = []
        for k in range(self.count):
            img, caption = draw_shapes(rng, self.size)
            img.save(folder / f"{k:05d}.png")
            lines.append(json.dumps({"file": f"{k:05d}.png", "caption": caption}))
        write_captions(folder, lines)
        return folder

    def load(self) -> list[dict[str, Any]]:
        return ImageFolder(str(self.write())).load()
