"""Calibration sources, seeded sampling, and clear errors on bad input."""

import json

import pytest
import torch
from torch import nn

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.errors import CalibrationDataError, OWLModelError, OWLNumericalError
from optimum_owl.pruning.data import draw_windows, get_calibration_data, sample_windows

from .conftest import ASSETS, calib_ids, needs_assets, tiny_model


class CharTokenizer:
    """Deterministic stand-in tokenizer: one id per character."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [3 + (ord(c) % 90) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen liquor jugs " * 3] * 4


def test_tensor_of_the_right_shape_is_used_as_is():
    ids = calib_ids(4, 16)
    assert torch.equal(get_calibration_data(ids, num_samples=4, seqlen=16), ids)


@pytest.mark.parametrize("kind", ["texts", "tensors", "dicts", "txt", "jsonl", "datasets"])
def test_every_source_gives_seeded_windows(kind, tmp_path):
    tok = CharTokenizer()
    if kind == "texts":
        source = TEXTS
    elif kind == "tensors":
        source = [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]
    elif kind == "dicts":
        source = [{"input_ids": tok(t)["input_ids"]} for t in TEXTS]
    elif kind == "txt":
        source = tmp_path / "calib.txt"
        source.write_text("\n\n".join(TEXTS))
    elif kind == "jsonl":
        source = tmp_path / "calib.jsonl"
        source.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    else:
        datasets = pytest.importorskip("datasets")
        source = datasets.Dataset.from_dict({"text": TEXTS})
    a = get_calibration_data(source, tok, num_samples=5, seqlen=32, seed=0)
    b = get_calibration_data(source, tok, num_samples=5, seqlen=32, seed=0)
    c = get_calibration_data(source, tok, num_samples=5, seqlen=32, seed=1)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_extra_windows_continue_the_draw_and_share_no_text_with_the_calibration_windows():
    # document d holds the ids 1000·d + 0..39, so every window tells which document it came from
    docs = torch.stack([torch.arange(40) + 1000 * d for d in range(1, 61)])
    calibration = get_calibration_data(docs, num_samples=8, seqlen=16, seed=3)
    ids, extra = draw_windows(docs, None, num_samples=8, seqlen=16, seed=3, extra=10)
    assert torch.equal(ids, calibration)  # the calibration windows are a plain run's
    assert extra.shape == (10, 16)
    doc = lambda w: int(w[0]) // 1000  # noqa: E731
    assert {doc(w) for w in extra}.isdisjoint({doc(w) for w in ids}) and len({doc(w) for w in extra}) == 10
    # too little other text: as many as there are documents left, one each
    _, few = draw_windows(docs, None, num_samples=8, seqlen=16, seed=3, extra=500)
    assert 0 < few.shape[0] <= 60 - len({doc(w) for w in ids}) and len({doc(w) for w in few}) == few.shape[0]
    # a tensor of exactly [num_samples, seqlen] is used as is: nothing else to draw from
    exact, none = draw_windows(calibration, None, num_samples=8, seqlen=16, seed=3, extra=4)
    assert torch.equal(exact, calibration) and none.shape == (0, 16)


def test_extra_windows_from_a_joined_stream_overlap_nothing():
    docs = [list(range(100 * d, 100 * d + 5)) for d in range(40)]  # short documents: the joined stream
    ids, extra = draw_windows([torch.tensor(d) for d in docs], None, num_samples=3, seqlen=8, seed=0, extra=6)
    assert torch.equal(ids, sample_windows(docs, num_samples=3, seqlen=8, seed=0))
    stream = [t for d in docs for t in d]
    start = lambda w: stream.index(int(w[0]))  # noqa: E731  (every id occurs once in this stream)
    spans = [start(w) for w in torch.cat([ids, extra])]
    assert extra.shape[0] == 6
    assert all(abs(spans[i] - spans[j]) >= 8 for i in range(3, 9) for j in range(9) if i != j)


def test_short_documents_fall_back_to_a_joined_stream():
    docs = [[5, 6, 7]] * 10
    out = sample_windows(docs, num_samples=3, seqlen=8, seed=0, eos_id=2)
    assert out.shape == (3, 8) and set(out.flatten().tolist()) <= {2, 5, 6, 7}


@pytest.mark.parametrize(
    "dataset, tokenizer, match",
    [
        (None, None, "No calibration data"),
        ([], CharTokenizer(), "empty"),
        (["some text"], None, "no tokenizer"),
        (["ab"], CharTokenizer(), "too short"),
        (torch.randn(2, 4), None, "integer token ids"),
        ("missing_file.jsonl", None, "does not exist"),
    ],
)
def test_bad_calibration_data_is_explained(dataset, tokenizer, match):
    with pytest.raises(CalibrationDataError, match=match):
        get_calibration_data(dataset, tokenizer, num_samples=2, seqlen=16)


def test_seqlen_is_checked_against_the_model_not_defaulted_to_it():
    model = tiny_model("llama")  # max_position_embeddings = 128
    config = OWLPrunerConfig(num_samples=2, seqlen=256)
    with pytest.raises(ValueError, match="`seqlen`=256 exceeds"):
        OWLPruner(config).prune(model, dataset=calib_ids(2, 256))


def test_token_ids_outside_the_vocabulary_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        OWLPruner(OWLPrunerConfig(num_samples=2, seqlen=8)).prune(model, dataset=torch.full((2, 8), 500))


def test_model_without_blocks_names_block_name():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(OWLModelError, match="block_name"):
        OWLPruner(OWLPrunerConfig(num_samples=2, seqlen=8)).prune(model, dataset=calib_ids(2, 8))
    with pytest.raises(OWLModelError, match="block_name='nope'"):
        OWLPruner(OWLPrunerConfig(block_name="nope")).prune(tiny_model("llama"), dataset=calib_ids(2, 8))


def test_nan_activations_name_the_block():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(OWLNumericalError, match="Block 1"):
        OWLPruner(OWLPrunerConfig(num_samples=4, seqlen=8, batch_size=2)).prune(model, dataset=calib_ids(4, 8))


def test_magnitude_uniform_needs_no_data():
    model = tiny_model("llama")
    report = OWLPruner(OWLPrunerConfig(method="magnitude", layerwise="uniform", sparsity=0.5)).prune(model)
    assert report.sparsity == pytest.approx(0.5)


def test_report_round_trips_and_renders(tmp_path):
    model = tiny_model("llama")
    report = OWLPruner(OWLPrunerConfig(num_samples=4, seqlen=16, batch_size=2)).prune(model, dataset=calib_ids(4))
    path = report.save(tmp_path)
    assert path.name == "owl_report.json"
    again = type(report).load(tmp_path)
    assert again.to_dict() == report.to_dict()
    md = report.to_markdown()
    assert "| block | outlier ratio |" in md and "%" in md
    assert set(report.timings) >= {"calibration_data", "capture", "outlier_pass", "prune_pass", "total"}
    assert model.owl_report is report


@needs_assets
def test_text_file_calibration_with_the_gpt2_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "gpt2")
    ids = get_calibration_data(ASSETS / "text" / "c4_train_first1000.jsonl", tok, num_samples=4, seqlen=256, seed=0)
    assert ids.shape == (4, 256) and int(ids.max()) < 50257
