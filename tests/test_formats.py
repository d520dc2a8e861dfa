"""Versions of the files we write: owl_config.json carries one; resume state of format 1 (big-endian mask bits) is
refused with a clear message; resume files pack masks with THE codec."""

from __future__ import annotations

import json

import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.config import CONFIG_FORMAT_VERSION
from optimum_owl.errors import OWLConfigError, ResumeMismatchError
from optimum_owl.formats.bitmask import pack_bits
from optimum_owl.pruning.resume import FORMAT_VERSION, STATE_FILE

from .conftest import calib_ids, tiny_model


def test_owl_config_json_has_a_format_version(tmp_path):
    path = OWLPrunerConfig(sparsity=0.6).save_pretrained(tmp_path)
    data = json.loads(path.read_text())
    assert data["format_version"] == CONFIG_FORMAT_VERSION
    assert OWLPrunerConfig.from_pretrained(tmp_path) == OWLPrunerConfig(sparsity=0.6)
    data["format_version"] = CONFIG_FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(OWLConfigError, match="format_version"):
        OWLPrunerConfig.from_pretrained(tmp_path)


def _config(ckpt):
    return OWLPrunerConfig(sparsity=0.5, method="wanda", layerwise="uniform", num_samples=4, seqlen=16, batch_size=2,
                           checkpoint_dir=str(ckpt))


def test_resume_state_of_format_1_is_refused(tmp_path):
    ckpt = tmp_path / "run"
    OWLPruner(_config(ckpt)).prune(tiny_model("llama", layers=2), dataset=calib_ids(4, 16))
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["version"] == FORMAT_VERSION == 3  # 3: checksums (issue 13), 2: codec bit order
    state["version"] = 1
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ResumeMismatchError, match="format 1.*Delete the folder"):
        OWLPruner(_config(ckpt)).prune(tiny_model("llama", layers=2), dataset=calib_ids(4, 16))


def test_resume_files_pack_masks_with_the_codec(tmp_path):
    ckpt = tmp_path / "run"
    model = tiny_model("llama", layers=2)
    OWLPruner(_config(ckpt)).prune(model, dataset=calib_ids(4, 16))
    saved = torch.load(ckpt / "block_00000.pt", weights_only=True)
    weight = model.model.layers[0].self_attn.q_proj.weight
    entry = next(v for k, v in saved.items() if k.endswith("self_attn.q_proj"))
    assert torch.equal(entry["bits"], pack_bits(weight != 0))
