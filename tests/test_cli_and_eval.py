import math

import pytest
import torch

from optimum_owl.cli import main
from optimum_owl.evaluation import perplexity_of_ids

from .conftest import calib_ids, tiny_model


def test_perplexity_matches_a_hand_computation():
    model = tiny_model("llama")
    ids = calib_ids(1, 48).reshape(-1)
    ppl = perplexity_of_ids(model, ids, seqlen=16, batch_size=2)
    nll, count = 0.0, 0
    for w in ids.view(3, 16):
        logits = model(input_ids=w[None]).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += 15
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


WORDS = [f"w{i}" for i in range(80)]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _saved_model_and_text(tmp_path):
    """A tiny Llama with a word-level tokenizer saved to `tmp_path/model`, and 600 random words of its vocabulary."""
    src = tmp_path / "model"
    tiny_model("llama").save_pretrained(src)
    _word_tokenizer().save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 80, (600,), generator=g)))
    return src, text


def test_cli_prune_and_eval_write_model_report_and_config_atomically(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    out = tmp_path / "pruned"
    args = ["prune", str(src), "--calibration", str(text), "--output-dir", str(out), "--sparsity", "0.5",
            "--num-samples", "4", "--seqlen", "32", "--batch-size", "2", "--eval-text", str(text)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| block | outlier ratio |" in printed and "dense" in printed
    assert {"owl_report.json", "owl_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]  # no temporary folder left
    assert main(args) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "32"]) == 0
    reported = float(capsys.readouterr().out.rsplit("sparsity", 1)[1])
    assert reported == pytest.approx(0.5, abs=0.02)  # OWL keeps the mean at 0.5 up to the per-row floor


def test_cli_rejects_bad_config_before_loading(tmp_path, capsys):
    rc = main(["prune", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"), "--sparsity", "1.5"])
    assert rc == 2
    assert "`sparsity`" in capsys.readouterr().err


def _cli_config(*flags: str):
    from optimum_owl.cli import build_parser
    from optimum_owl.config_flags import config_from_args

    return config_from_args(build_parser().parse_args(["prune", "MODEL", "-o", "OUT", *flags]))


def test_cli_defaults_are_the_config_defaults_and_every_optional_flag_is_a_config_field():
    import dataclasses

    from optimum_owl import OWLPrunerConfig
    from optimum_owl.cli import build_parser
    from optimum_owl.config_flags import OPTIONAL_FIELDS

    assert _cli_config() == OWLPrunerConfig()  # no flag restates a default differently
    assert set(OPTIONAL_FIELDS) <= {f.name for f in dataclasses.fields(OWLPrunerConfig)}
    parser = build_parser()
    given = vars(parser.parse_args(["prune", "M", "-o", "O"]))
    assert not set(OPTIONAL_FIELDS) & set(given)  # not given -> absent, so the config's own default applies
    prune_help = parser._subparsers._group_actions[0].choices["prune"].format_help()
    assert all("--" + name.replace("_", "-") in prune_help for name in OPTIONAL_FIELDS)


def test_every_config_field_has_a_flag_with_its_help_or_is_marked_without_one():
    """Help is written once, in the field's metadata; the parser shows it (and the default) under the field's group."""
    import dataclasses

    from optimum_owl import OWLPrunerConfig
    from optimum_owl.cli import build_parser
    from optimum_owl.config_flags import GROUPS, OPTIONAL_FIELDS

    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    by_flag = {opt: a for a in prune._actions for opt in a.option_strings}
    titles = {a.dest: g.title for g in prune._action_groups for a in g._group_actions}
    for f in dataclasses.fields(OWLPrunerConfig):
        if f.metadata.get("flag") is False:  # runtime-only or not an init argument: no flag, and it says so
            assert f.name not in OPTIONAL_FIELDS and f.metadata.get("help"), f.name
            continue
        assert f.name in OPTIONAL_FIELDS, f"{f.name}: give it metadata help and group (config._flag) or flag=False"
        text, group = f.metadata.get("help", ""), f.metadata.get("group")
        action = by_flag["--" + f.name.replace("_", "-")]
        assert text.strip() and action.dest == f.name and action.help.startswith(text + " (default: ")
        assert titles[f.name] == GROUPS[group]
    assert list(OPTIONAL_FIELDS) == [n for g in GROUPS for n in OPTIONAL_FIELDS if titles[n] == GROUPS[g]]


_ROUND_TRIP_CONFIGS = [
    dict(sparsity=0.6, layerwise="auto", owl_m=7.0, owl_lambda=0.1, dlp_alpha=0.2, alphapruning_epsilon=0.3,
         atp_beta=0.01, attention_shift=-0.05, auto_holdout=0.25, auto_holdout_dataset="val.jsonl",
         auto_owl_ms=[4.0], auto_owl_lambdas=[0.1, 0.2], auto_finalists=2, auto_families=["atp", "dlp"],
         auto_dlp_alphas=[0.1, 0.3], auto_alphapruning_epsilons=[0.25], auto_atp_betas=[0.01, 0.02],
         auto_attention_shifts=[-0.05, 0.025], refine="dsnot", dsnot_cycles=7, dsnot_threshold=0.01,
         wanda_group="layer", text_column="body", ignore=["*q_proj", "re:.*k_proj"], block_name="model.layers",
         num_samples=16, seqlen=256, batch_size=4, seed=3),
    dict(method="sparsegpt", layerwise="uniform", pattern="2:4", nm_mixed=True, sparsegpt_blocksize=64,
         sparsegpt_damp=0.05, checkpoint_dir="ckpt", offload_folder="off", values="int8", group_size=128),
    dict(method="magnitude", propagation="dense", layerwise="dlp", auto_holdout_tokens=0, offload_activations=True,
         device="cpu"),
]


@pytest.mark.parametrize("kwargs", _ROUND_TRIP_CONFIGS)
def test_config_to_flags_to_config_round_trips(kwargs):
    """`config_flags` is the inverse of `config_from_args`, up to the fields that do not change the result."""
    import dataclasses

    from optimum_owl import OWLPrunerConfig
    from optimum_owl.config import NON_RESULT_FIELDS
    from optimum_owl.config_flags import config_default, config_flags

    config = OWLPrunerConfig(**kwargs)
    flags = config_flags(config.to_dict())
    assert not {"--device", "--offload-folder", "--checkpoint-dir", "--offload-activations"} & set(flags)
    expected = dataclasses.replace(config, **{n: config_default(n) for n in NON_RESULT_FIELDS if n in kwargs})
    assert _cli_config(*flags).to_dict() == expected.to_dict()


def test_the_round_trip_configs_set_every_flag_that_changes_the_result():
    from optimum_owl import OWLPrunerConfig
    from optimum_owl.config import NON_RESULT_FIELDS
    from optimum_owl.config_flags import OPTIONAL_FIELDS, config_default

    dicts = [OWLPrunerConfig(**kwargs).to_dict() for kwargs in _ROUND_TRIP_CONFIGS]
    covered = {n for d in dicts for n in OPTIONAL_FIELDS if d.get(n) != config_default(n)}
    assert set(OPTIONAL_FIELDS) - set(NON_RESULT_FIELDS) - covered == set()  # add a new flag's field to one above


def test_cli_optional_flags_reach_the_config():
    config = _cli_config(
        "--method", "wanda", "--refine", "dsnot", "--dsnot-cycles", "7", "--dsnot-threshold", "0.01",
        "--wanda-group", "layer", "--sparsegpt-blocksize", "64", "--sparsegpt-damp", "0.05",
        "--layerwise", "owl-auto", "--auto-owl-ms", "4", "6", "--auto-owl-lambdas", "0.03", "0.1",
        "--auto-holdout", "0.25", "--auto-finalists", "2",
        "--offload-activations", "--device", "cpu", "--offload-folder", "off", "--propagation", "sequential",
    )
    assert (config.refine, config.dsnot_cycles, config.dsnot_threshold) == ("dsnot", 7, 0.01)
    assert (config.wanda_group, config.sparsegpt_blocksize, config.sparsegpt_damp) == ("layer", 64, 0.05)
    assert (config.auto_owl_ms, config.auto_owl_lambdas) == ([4.0, 6.0], [0.03, 0.1])
    assert (config.auto_holdout, config.auto_finalists) == (0.25, 2)
    assert (config.offload_activations, config.device, config.offload_folder) == (True, "cpu", "off")
    assert _cli_config("--checkpoint-dir", "ckpt").checkpoint_dir == "ckpt"
    auto = _cli_config("--layerwise", "auto", "--auto-holdout-dataset", "/data/wikitext2_validation.jsonl")
    assert auto.auto_holdout_dataset == "/data/wikitext2_validation.jsonl"
    from optimum_owl.hub.card import prune_command
    from optimum_owl.utils import public_config

    # the published command names the file, never the local folder
    assert "--auto-holdout-dataset wikitext2_validation.jsonl" in prune_command(public_config(auto.to_dict()), "M", None)


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--auto-holdout", "0.9"], "auto_holdout"),
        (["--refine", "dsnot", "--method", "sparsegpt"], "refine"),
        (["--dsnot-threshold", "1.5"], "dsnot_threshold"),
        (["--checkpoint-dir", "c", "--layerwise", "owl-auto"], "checkpoint_dir"),
        (["--auto-holdout-dataset", "val.jsonl"], "auto_holdout_dataset"),
        (["--device", "nonsense:0"], "device"),
    ],
)
def test_cli_optional_flags_bad_values_name_the_field(tmp_path, capsys, flags, field):
    rc = main(["prune", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"), *flags])
    assert rc == 2
    assert f"`{field}`" in capsys.readouterr().err


def test_cli_refine_dsnot_with_dense_checkpoint_matches_the_compact_one(tmp_path, capsys, monkeypatch):
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import optimum_owl.algorithms.dsnot

    calls = []
    real = optimum_owl.algorithms.dsnot.dsnot_keep_mask

    def counting(weight, keep, mean, mean_sq, nm, cycles, threshold):
        calls.append((cycles, threshold))
        return real(weight, keep, mean, mean_sq, nm, cycles, threshold)

    monkeypatch.setattr(optimum_owl.algorithms.dsnot, "dsnot_keep_mask", counting)
    src, text = _saved_model_and_text(tmp_path)
    common = ["prune", str(src), "--calibration", str(text), "--sparsity", "0.5", "--num-samples", "4",
              "--seqlen", "32", "--batch-size", "2", "--refine", "dsnot", "--dsnot-cycles", "5"]
    assert main([*common, "--output-dir", str(tmp_path / "dense"), "--dense-checkpoint"]) == 0
    assert "dense, zeros in place" in capsys.readouterr().out
    assert main([*common, "--output-dir", str(tmp_path / "compact")]) == 0
    assert calls and set(calls) == {(5, 0.001)}  # the refinement ran, with the flag's cycles and the default threshold

    dense_dir, compact_dir = tmp_path / "dense", tmp_path / "compact"
    saved = json.loads((dense_dir / "owl_config.json").read_text())
    assert (saved["refine"], saved["dsnot_cycles"]) == ("dsnot", 5)
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    assert json.loads((compact_dir / "config.json").read_text())["quantization_config"]["refine"] == "dsnot"
    with safe_open(str(dense_dir / "model.safetensors"), framework="pt") as fh:
        assert not [k for k in fh.keys() if k.endswith("_bitmask")]
    with safe_open(str(compact_dir / "model.safetensors"), framework="pt") as fh:
        assert [k for k in fh.keys() if k.endswith("_bitmask")]
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).state_dict()
    compact = AutoModelForCausalLM.from_pretrained(compact_dir).state_dict()
    assert dense.keys() == compact.keys()
    assert all(torch.equal(dense[k], compact[k]) for k in dense)
    zeros = sum(int((v == 0).sum()) for k, v in dense.items() if k.endswith("proj.weight"))
    total = sum(v.numel() for k, v in dense.items() if k.endswith("proj.weight"))
    assert zeros / total == pytest.approx(0.5, abs=0.02)
