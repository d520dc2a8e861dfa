"""`repair()` under `accelerate launch` with 2 CPU processes (torchrun + gloo) matches a single-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

METHODS = ("masked_lora", "full_ft")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("accelerate") is None, reason="needs the accelerate launcher")
def test_two_process_repair_matches_single_process(tmp_path):
    import repair_ddp_script

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="True", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # `--cpu` alone runs a single process in accelerate 1.15; `--multi_gpu` + ACCELERATE_USE_CPU gives DDP on gloo.
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517", str(HERE / "repair_ddp_script.py"), str(tmp_path), "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch.set_num_threads(1)
    for method in METHODS:
        repair_ddp_script.run(tmp_path, 4, method)
        single = torch.load(tmp_path / f"{method}-world1-rank0.pt")
        r0 = torch.load(tmp_path / f"{method}-world2-rank0.pt")
        r1 = torch.load(tmp_path / f"{method}-world2-rank1.pt")
        assert r0["world"] == r1["world"] == 2 and r0["steps"] == single["steps"] == 4
        for k in r0["masks_before"]:  # masks identical on every rank, and unchanged by training
            assert torch.equal(r0["masks_before"][k], r1["masks_before"][k])
            assert torch.equal(r0["masks_after"][k], r1["masks_after"][k])
            assert torch.equal(r0["masks_after"][k], r0["masks_before"][k])
            assert torch.equal(r0["masks_after"][k], single["masks_after"][k])
        assert r0["zeros_preserved"] and r1["zeros_preserved"]
        for k, v in r0["state"].items():
            assert torch.equal(v, r1["state"][k]), (method, k)  # DDP keeps ranks bitwise in sync
            assert torch.allclose(v, single["state"][k], atol=2e-4, rtol=0), (method, k)
