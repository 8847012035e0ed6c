"""models/data.py: deterministic, split-disjoint, correctly shaped feeds; and, on the real zoo
models, data realistic enough that the original models do their job on it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models import data
from tests.zoo.conftest import model_path

pytest.importorskip("PIL")


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------
# Without the zoo (fast)


def test_rec_lines_shape_range_and_determinism():
    x, texts = data.rec_lines("ppocr-v4-rec", "eval", 3, seed=1)
    assert x.shape == (3, 3, 48, 320) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert all(texts)
    x2, texts2 = data.rec_lines("ppocr-v4-rec", "eval", 3, seed=1)
    assert np.array_equal(x, x2) and texts == texts2


def test_splits_are_disjoint():
    _, calib = data.rec_lines("ppocr-v5-rec", "calib", 12)
    _, evals = data.rec_lines("ppocr-v5-rec", "eval", 12)
    assert not set(calib) & set(evals)
    assert not set(data.split_sentences("calib")) & set(data.split_sentences("eval"))
    assert not np.array_equal(data.audio_stream("calib", 1.0), data.audio_stream("eval", 1.0))
    with pytest.raises(ValueError):
        data.feeds_for("ppocr-v4-rec", "train")


def test_cls_lines_labels_alternate():
    x, labels = data.cls_lines("ppocr-v4-cls", "calib", 4)
    assert x.shape == (4, 3, 48, 192)
    assert sorted(set(labels)) == [0, 1] and all(
        a != b for a, b in zip(labels, labels[1:], strict=False)
    )


def test_det_pages_normalized_with_boxes():
    x, boxes = data.det_pages("ppocr-v4-det", "eval", 1)
    assert x.shape == (1, 3, 640, 640) and x.dtype == np.float32
    assert len(boxes[0]) >= 3
    # A light page: most pixels are near white after ImageNet normalization (> 1.5).
    assert np.median(x[0, 0]) > 1.5


def test_silero_feed_layout_without_model(tmp_path):
    feeds = data.silero_feeds("eval", 3, model_path=tmp_path / "missing.onnx")
    assert len(feeds) == 3
    for feed in feeds:
        assert feed["input"].shape == (1, data.SILERO_CHUNK + data.SILERO_CONTEXT)
        assert feed["state"].shape == (2, 1, 128) and not feed["state"].any()
        assert feed["sr"].dtype == np.int64 and feed["sr"].shape == () and feed["sr"] == 16000
        assert np.abs(feed["input"]).max() <= 1.0


def test_ctc_greedy_decode_and_cer():
    classes = ["blank", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 3, 0, 2]  # a a _ a b b ' ' _ b -> "aab b"
    probs = np.eye(4, dtype=np.float32)[steps][None]
    assert data.ctc_greedy_decode(probs, classes) == ["aab b"]
    assert data.cer(["aab b"], ["aab b"]) == 0.0
    assert data.cer(["kitten"], ["sitting"]) == pytest.approx(3 / 7)


def test_save_npz_round_trip(tmp_path):
    feeds = [
        {"x": np.arange(6, dtype=np.float32).reshape(1, 6)},
        {"x": np.ones((1, 6), np.float32)},
    ]
    files = data.save_npz(feeds, tmp_path / "feeds")
    assert [f.name for f in files] == ["0000.npz", "0001.npz"]
    with np.load(files[0]) as loaded:
        assert np.array_equal(loaded["x"], feeds[0]["x"])
    (single,) = data.save_npz(feeds[1], tmp_path / "one.npz")
    assert single.is_file()


# ----------------------------------------------------------------------------------------------
# On the zoo: the original models must do their job on this data


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-v4-rec", "ppocr-v5-rec"])
def test_rec_reads_the_rendered_text(name):
    session = _session(model_path(name))
    x, texts = data.rec_lines(name, "eval", 16)
    predicted = data.ctc_greedy_decode(session.run(None, {"x": x})[0], data.ctc_classes(name))
    assert data.cer(predicted, texts) < 0.1, list(zip(texts, predicted, strict=True))


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-v4-cls", "ppocr-v5-cls"])
def test_cls_sees_the_rotation(name):
    session = _session(model_path(name))
    x, labels = data.cls_lines(name, "eval", 16)
    predicted = session.run(None, {"x": x})[0].argmax(-1)
    assert np.mean(predicted == np.array(labels)) >= 0.9


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-v4-det", "ppocr-v5-det"])
def test_det_finds_the_lines(name):
    session = _session(model_path(name))
    x, boxes = data.det_pages(name, "eval", 1)
    text_map = session.run(None, {"x": x})[0][0, 0] > 0.3
    inside = np.zeros_like(text_map)
    for x0, y0, x1, y1 in boxes[0]:
        inside[y0:y1, x0:x1] = True
    # DBNet marks a shrunk core of each line; nothing outside the lines.
    assert text_map[inside].mean() > 0.2
    assert text_map[~inside].mean() < 0.01
    assert all(text_map[y0:y1, x0:x1].any() for x0, y0, x1, y1 in boxes[0])


@pytest.mark.zoo
def test_silero_tells_words_from_pauses():
    session = _session(model_path("silero-vad"))
    probs, _ = data.silero_stream(session, data.audio_stream("eval", 4.0))
    assert probs.max() > 0.9 and probs.min() < 0.1


@pytest.mark.zoo
def test_minilm_pairs_paraphrases():
    session = _session(model_path("minilm-l6"))
    pytest.importorskip("transformers")
    sentences = data.split_sentences("eval")
    feed = data.tokenize(sentences)
    emb = data.sentence_embeddings(session.run(None, feed)[0], feed["attention_mask"])
    sim = emb @ emb.T
    np.fill_diagonal(sim, -2)
    assert np.mean(sim.argmax(1) == (np.arange(len(sentences)) ^ 1)) >= 0.9
