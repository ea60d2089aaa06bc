"""Realistic, deterministic calibration and evaluation inputs for the real models.

* PP-OCR: ``document_images`` (white pages with lines of black text of varied size and a few boxes)
  and ``text_lines`` (one rendered line each), drawn with Pillow and a DejaVu system font (PIL's
  default font when DejaVu is missing; ``FONT_NOTE`` then says so). ``ppocr_det_input``,
  ``ppocr_rec_input`` and ``ppocr_cls_input`` apply rapidocr-onnxruntime 1.4.4's own preprocessing:
  BGR, x / 255, NCHW; det normalizes with mean = std = 0.5 (its config.yaml; PaddleOCR's own det
  config uses the ImageNet mean/std, ``imagenet=True``); rec/cls resize to height 48 keeping the
  aspect ratio, (x - 0.5) / 0.5, zero padding on the right to width 320 (rec) or 192 (cls).
* MiniLM exports: ``sentences`` (English sentences from the Python standard library's docstrings)
  and ``token_ids`` (a tokenizer-free mapping: words hashed into the vocabulary range, [CLS] ...
  [SEP], padding masked). It is meant for calibrating and checking the encoder's numbers, not for
  meaning. The sentences depend on the Python version's docstrings.

Everything returns numpy arrays ready to feed; the same arguments give the same bytes.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import zlib
from functools import cache
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf")
FONT_NOTE: str | None = None

STDLIB_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip", "hashlib",
    "heapq", "hmac", "inspect", "ipaddress", "itertools", "json", "logging", "mimetypes", "operator", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "socket",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest", "uuid", "warnings", "weakref", "zipfile",
)  # fmt: skip

DET_MEAN = (0.5, 0.5, 0.5)
DET_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# text


@cache
def _sentence_pool() -> tuple[str, ...]:
    """Every usable sentence of the standard library docstrings, deduplicated, in a fixed order."""
    texts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == module.__name__:
                texts.append(inspect.getdoc(obj) or "")
    seen: dict[str, None] = {}
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            if re.search(r">>>|::|^\s*[-*]\s|\s{4}", paragraph, flags=re.M):
                continue
            flat = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
                words = sentence.split()
                if (
                    6 <= len(words) <= 40
                    and sentence[0].isupper()
                    and sentence[-1] in ".!?"
                    and re.fullmatch(r"[A-Za-z0-9 ,.;:'\"!?()-]+", sentence)
                ):
                    seen.setdefault(sentence, None)
    return tuple(seen)


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` English sentences from the standard library's docstrings, shuffled by ``seed`` (repeating when n is larger)."""
    pool = _sentence_pool()
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[order[i % len(pool)]] for i in range(n)]


def words_of(sentence: str) -> list[str]:
    """Lower-case words, numbers and punctuation marks, in order."""
    return re.findall(r"[a-z]+|\d+|[^\sa-z\d]", sentence.lower())


def token_ids(texts: list[str], seq_len: int = 128, vocab: int = 30522) -> dict[str, np.ndarray]:
    """``input_ids`` / ``attention_mask`` (int64, [n, seq_len]) for a BERT-style encoder, without a tokenizer.

    Each word is hashed (CRC-32) into the vocabulary's word range; [CLS] and [SEP] frame the
    sentence; the rest is padding (id 0, mask 0). BERT's ids (CLS 101, SEP 102, words from 1000)
    when the vocabulary is large enough, else 1, 2 and words from 3.
    """
    if seq_len < 3:
        raise ValueError("seq_len must be at least 3")
    cls_id, sep_id, first = (101, 102, 1000) if vocab >= 2000 else (1, 2, 3)
    ids = np.zeros((len(texts), seq_len), np.int64)
    mask = np.zeros((len(texts), seq_len), np.int64)
    for row, text in enumerate(texts):
        body = [first + zlib.crc32(w.encode()) % (vocab - first) for w in words_of(text)][: seq_len - 2]
        tokens = [cls_id, *body, sep_id]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def minilm_inputs(n: int, seq_len: int = 128, seed: int = 0, vocab: int = 30522) -> dict[str, np.ndarray]:
    """Feeds for the MiniLM exports: ``n`` real sentences at ``seq_len`` tokens."""
    return token_ids(sentences(n, seed), seq_len, vocab)


# ----------------------------------------------------------------------------------------------
# images


def _font(size: int, index: int = 0):
    global FONT_NOTE
    from PIL import ImageFont

    path = FONT_DIR / FONT_FILES[index % len(FONT_FILES)]
    if path.is_file():
        return ImageFont.truetype(str(path), size)
    FONT_NOTE = f"DejaVu fonts not found in {FONT_DIR}: text drawn with PIL's default font"
    return ImageFont.load_default(size)


def _phrase(rng: np.random.Generator, pool: tuple[str, ...], max_words: int) -> str:
    words = pool[int(rng.integers(len(pool)))].split()
    start = int(rng.integers(max(1, len(words) - 2)))
    return " ".join(words[start : start + int(rng.integers(2, max_words + 1))])


def document_images(n: int, size: tuple[int, int] = (320, 320), seed: int = 0) -> np.ndarray:
    """``n`` document-like pages, uint8 RGB [n, height, width, 3]: lines of dark text of varied size, a few boxes and rules."""
    from PIL import Image, ImageDraw

    height, width = size
    pool = _sentence_pool()
    rng = np.random.default_rng(seed)
    pages = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        paper = tuple(int(v) for v in rng.integers(235, 256, 3))
        image = Image.new("RGB", (width, height), paper)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):  # boxes (tables, stamps, figures), some filled lightly
            x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
            x1, y1 = x0 + int(rng.integers(width // 8, width // 2)), y0 + int(rng.integers(height // 10, height // 3))
            fill = tuple(int(v) for v in rng.integers(200, 250, 3)) if rng.random() < 0.4 else None
            draw.rectangle(
                (x0, y0, x1, y1), outline=tuple(int(v) for v in rng.integers(0, 120, 3)), fill=fill, width=int(rng.integers(1, 3))
            )
        y = int(rng.integers(4, 16))
        while y < height - 8:
            font_size = int(rng.integers(9, 26))
            font = _font(font_size, int(rng.integers(len(FONT_FILES))))
            ink = tuple(int(v) for v in rng.integers(0, 70, 3))
            x = int(rng.integers(4, max(5, width // 6)))
            if rng.random() < 0.1:
                draw.line((x, y + font_size // 2, width - x, y + font_size // 2), fill=ink, width=1)
            else:
                draw.text((x, y), _phrase(rng, pool, 9), fill=ink, font=font)
            y += int(font_size * rng.uniform(1.2, 2.2))
        pages[i] = np.asarray(image)
    return pages


def text_lines(n: int, height: int = 48, width: int = 320, seed: int = 0, *, flipped: float = 0.0) -> list[np.ndarray]:
    """``n`` single text lines, uint8 RGB [height, w_i, 3] with w_i <= width, scaled to ``height`` keeping the aspect ratio.

    A fraction ``flipped`` of them (drawn by the seed) is rotated by 180 degrees, as the cls model must detect.
    """
    from PIL import Image, ImageDraw

    pool = _sentence_pool()
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        font_size = int(rng.integers(18, 40))
        font = _font(font_size, int(rng.integers(len(FONT_FILES))))
        text = _phrase(rng, pool, 7)
        left, top, right, bottom = font.getbbox(text)
        pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
        w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
        paper = tuple(int(v) for v in rng.integers(220, 256, 3))
        image = Image.new("RGB", (w, h), paper)
        ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=tuple(int(v) for v in rng.integers(0, 80, 3)), font=font)
        new_w = min(width, max(1, math.ceil(height * w / h)))
        image = image.resize((new_w, height), Image.Resampling.BILINEAR)
        if rng.random() < flipped:
            image = image.rotate(180)
        lines.append(np.asarray(image))
    return lines


def ppocr_det_input(images: np.ndarray, *, imagenet: bool = False) -> np.ndarray:
    """PP-OCR det input [n, 3, H, W] float32 from uint8 RGB pages: BGR, x / 255, (x - mean) / std (rapidocr's 0.5/0.5)."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (DET_MEAN, DET_STD)
    x = images[..., ::-1].astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def ppocr_rec_input(lines: list[np.ndarray], height: int = 48, width: int = 320) -> np.ndarray:
    """PP-OCR rec/cls input [n, 3, height, width] float32: BGR, height-resized, (x/255 - 0.5) / 0.5, zero-padded right."""
    from PIL import Image

    batch = np.zeros((len(lines), 3, height, width), np.float32)
    for i, line in enumerate(lines):
        h, w = line.shape[:2]
        new_w = min(width, math.ceil(height * w / h))
        if (h, w) != (height, new_w):
            line = np.asarray(Image.fromarray(line).resize((new_w, height), Image.Resampling.BILINEAR))
        x = line[..., ::-1].astype(np.float32).transpose(2, 0, 1) / np.float32(255)
        batch[i, :, :, :new_w] = (x - np.float32(0.5)) / np.float32(0.5)
    return batch


def ppocr_cls_input(lines: list[np.ndarray]) -> np.ndarray:
    """PP-OCR cls input [n, 3, 48, 192] float32 (the rec preprocessing at width 192)."""
    return ppocr_rec_input(lines, 48, 192)


def ppocr_inputs(model: str, n: int, seed: int = 0, size: tuple[int, int] = (320, 320)) -> dict[str, np.ndarray]:
    """Feeds for ``ppocr_det`` (``size`` pages), ``ppocr_rec`` or ``ppocr_cls`` (text lines, a quarter upside down): {"x": array}."""
    if model == "ppocr_det":
        return {"x": ppocr_det_input(document_images(n, size, seed))}
    if model == "ppocr_rec":
        return {"x": ppocr_rec_input(text_lines(n, 48, 320, seed))}
    if model == "ppocr_cls":
        return {"x": ppocr_cls_input(text_lines(n, 48, 192, seed, flipped=0.25))}
    raise ValueError(f"unknown PP-OCR model '{model}' (ppocr_det, ppocr_rec, ppocr_cls)")
