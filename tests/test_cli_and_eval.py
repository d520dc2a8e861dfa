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


def test_cli_prune_and_eval_write_model_report_and_config_atomically(tmp_path, capsys):
    src = tmp_path / "model"
    tiny_model("llama").save_pretrained(src)
    _word_tokenizer().save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 80, (600,), generator=g)))
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
