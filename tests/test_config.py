import json

import pytest

from optimum_owl import OWLConfigError, OWLPrunerConfig
from optimum_owl.config import parse_pattern


def test_round_trip_dict_json_and_directory(tmp_path):
    config = OWLPrunerConfig(sparsity=0.6, method="sparsegpt", pattern="2:4", ignore=["*.q_proj"], seed=3)
    assert OWLPrunerConfig.from_dict(config.to_dict()) == config
    assert OWLPrunerConfig.from_json(config.to_json_string()) == config
    path = config.save_pretrained(tmp_path / "cfg")
    assert path.name == "owl_config.json"
    assert OWLPrunerConfig.from_pretrained(tmp_path / "cfg") == config
    assert json.loads(path.read_text())["quant_method"] == "owl"


def test_runtime_fields_are_not_serialised():
    config = OWLPrunerConfig(dataset=["some text"], tokenizer=object())
    data = config.to_dict()
    assert "tokenizer" not in data and "dataset" not in data
    assert OWLPrunerConfig(dataset="calib.jsonl").to_dict()["dataset"] == "calib.jsonl"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": float("nan")}, "sparsity"),
        ({"owl_lambda": -0.01}, "owl_lambda"),
        ({"owl_m": 0}, "owl_m"),
        ({"owl_m": -2.0}, "owl_m"),
        ({"pattern": "2-4"}, "pattern"),
        ({"pattern": "4:4"}, "pattern"),
        ({"pattern": "0:4"}, "pattern"),
        ({"method": "obs"}, "method"),
        ({"layerwise": "per-layer"}, "layerwise"),
        ({"num_samples": 0}, "num_samples"),
        ({"seqlen": -5}, "seqlen"),
        ({"propagation": "dense", "method": "sparsegpt"}, "propagation"),
        ({"wanda_group": "column"}, "wanda_group"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(OWLConfigError, match=f"`{field}`"):
        OWLPrunerConfig(**kwargs)


def test_nm_convention_is_kept_non_zeros():
    assert parse_pattern("2:4") == (2, 4)
    assert OWLPrunerConfig(pattern="2:4").target_sparsity == 0.5
    assert OWLPrunerConfig(pattern="1:4").target_sparsity == 0.75
    assert parse_pattern("unstructured") is None


def test_unknown_keys_are_refused_like_the_constructor():
    with pytest.raises(OWLConfigError, match="`future_field`"):
        OWLPrunerConfig.from_dict({"sparsity": 0.5, "future_field": 1})
    # the keys the files themselves carry are accepted; transformers' protocol returns unknown keyword arguments
    config, unused = OWLPrunerConfig.from_dict({"sparsity": 0.5, "quant_method": "owl", "format_version": 1},
                                               return_unused_kwargs=True, device_map="auto")
    assert config.sparsity == 0.5 and unused == {"device_map": "auto"}
