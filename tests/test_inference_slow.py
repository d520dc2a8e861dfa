"""Slow sparse-inference tests: a real 135M model, and building the kernel from an empty cache (twice at once)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from optimum_owl.inference import SparseLinear, densify, kernel_status, sparsify

from .conftest import ASSETS, needs_assets

SMOLLM = ASSETS / "models" / "smollm2-135m"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@needs_assets
@pytest.mark.parametrize("dtype", [torch.float32])
def test_smollm2_sparse_greedy_generation_identical_to_dense_with_zeros(dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SMOLLM, gguf_file=GGUF, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM, gguf_file=GGUF)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # 60% unstructured, magnitude per row (as a pruned model would be)
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
                w = module.weight
                k = int(0.6 * w.shape[1])
                idx = (w.abs() + 1e-9 * torch.rand(w.shape, generator=g)).topk(k, dim=1, largest=False).indices
                w.scatter_(1, idx, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tokenizer("Once upon a time, there was a little girl who", return_tensors="pt")
    with torch.inference_mode():
        dense = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        sparsify(model)
        assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 7 * 30
        assert kernel_status()["kernel"], kernel_status()
        sparse = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(sparse, dense), (tokenizer.decode(sparse[0]), tokenizer.decode(dense[0]))
    densify(model)
    after = model.state_dict()
    assert all(torch.equal(v.view(torch.int32), after[k].view(torch.int32)) for k, v in before.items()
               if v.dtype == torch.float32)


@pytest.mark.slow
def test_kernel_builds_from_an_empty_cache_with_two_processes_at_once(tmp_path):
    from optimum_owl.inference.kernel import unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(f"kernel unavailable here: {unavailable_reason()}")
    code = (
        "import torch; from optimum_owl.inference import SparseLinear, kernel_status\n"
        "lin = torch.nn.Linear(70, 9); lin.weight.data[:, ::2] = 0\n"
        "s = SparseLinear.from_dense(lin); x = torch.randn(2, 70)\n"
        "assert kernel_status()['kernel'], kernel_status()\n"
        "torch.testing.assert_close(s(x), lin(x).detach(), rtol=1e-5, atol=1e-5); print('OK')\n"
    )
    env = dict(os.environ, OPTIMUM_OWL_KERNEL_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "OK" in out, err[-2000:]
    assert len(list((tmp_path / "cache").glob("*/*.so"))) == 1
