"""Pruning models dispatched by Accelerate (CPU + disk offload), `device=` for plain models, multi-GPU planning."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_owl import OWLConfigError, OWLPruner, OWLPrunerConfig
from optimum_owl.pruning.modeling import get_blocks_and_units
from optimum_owl.pruning.offload import BlockOffloader, is_dispatched, main_device, offload_hook, plan_block_devices
from optimum_owl.pruning.runner import module_device

NUM_LAYERS = 4
# embeddings and blocks 0, 2 in RAM; blocks 1, 3, the final norm and lm_head on disk
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}


def _sha256(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


def _config(**kw) -> OWLPrunerConfig:
    base = dict(sparsity=0.5, method="wanda", layerwise="owl", owl_m=3.0, owl_lambda=0.08, num_samples=8, seqlen=16, batch_size=4)
    base.update(kw)
    return OWLPrunerConfig(**base)


def _masks(model) -> dict[str, torch.Tensor]:
    """Keep masks of every block weight, read through the offload store where needed."""
    _, blocks, units = get_blocks_and_units(model)
    offloader = BlockOffloader(model)
    out = {}
    for i, block in enumerate(blocks):
        with offloader(i, block):
            for u in units[i]:
                out[u.name] = (u.weight() != 0).cpu().clone()
    return out


def _load_offloaded(path: Path, offload: Path):
    return AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE_MAP, offload_folder=str(offload))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_offloaded_masks_match_in_memory(checkpoint, calib, tmp_path, method):
    before = _sha256(checkpoint)
    layerwise = "uniform" if method == "magnitude" else "owl"
    ref = AutoModelForCausalLM.from_pretrained(checkpoint)
    ref_report = OWLPruner(_config(method=method, layerwise=layerwise)).prune(ref, dataset=calib)

    model = _load_offloaded(checkpoint, tmp_path / "offload")
    assert is_dispatched(model)
    assert offload_hook(model.model.layers[1].self_attn.q_proj) is not None
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    report = OWLPruner(_config(method=method, layerwise=layerwise)).prune(model, dataset=calib)

    ref_masks, masks = _masks(ref), _masks(model)
    assert ref_masks.keys() == masks.keys()
    for name in ref_masks:
        assert torch.equal(ref_masks[name], masks[name]), name
    # the report reads offloaded blocks through the store: same numbers as in memory
    assert [b.achieved_sparsity for b in report.blocks] == [b.achieved_sparsity for b in ref_report.blocks]
    assert report.blocks[1].achieved_sparsity > 0.3  # a disk block really was pruned
    if method == "sparsegpt":  # weights updated on disk blocks too
        _, blocks, units = get_blocks_and_units(model)
        with BlockOffloader(model)(3, blocks[3]):
            w = units[3][0].weight().clone()
        assert torch.equal(w, ref.model.layers[3].self_attn.q_proj.weight)
    # offloaded weights went back to meta; the original checkpoint is untouched
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert _sha256(checkpoint) == before
    # forward of the offloaded model equals the in-memory pruned model
    ids = calib[:2]
    assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)


def test_heap_retention_limited_only_for_offloaded_models(checkpoint, calib, tmp_path, monkeypatch):
    from optimum_owl.pruning import offload

    calls = []
    monkeypatch.setattr(offload, "limit_heap_retention", lambda: calls.append(1) or True)
    OWLPruner(_config(layerwise="uniform")).prune(AutoModelForCausalLM.from_pretrained(checkpoint), dataset=calib)
    assert calls == []  # a model held in RAM: the process's allocator settings are left alone
    OWLPruner(_config(layerwise="uniform")).prune(_load_offloaded(checkpoint, tmp_path / "offload"), dataset=calib)
    assert calls  # set before the capture (embeddings read from the store) and checked per offloaded block
    monkeypatch.undo()
    from optimum_owl.pruning import memory

    if memory.glibc():  # glibc: mallopt accepted the fixed thresholds
        assert offload.limit_heap_retention() is True


def test_write_back_goes_to_new_store_and_survives_save(checkpoint, calib, tmp_path):
    before = _sha256(checkpoint)
    model = _load_offloaded(checkpoint, tmp_path / "offload")
    store = model.model.layers[1].self_attn.q_proj._hf_hook.weights_map.dataset
    key = "model.layers.1.self_attn.q_proj.weight"
    assert Path(store.index[key]["safetensors_file"]).resolve() == (checkpoint / "model.safetensors").resolve()
    OWLPruner(_config()).prune(model, dataset=calib)
    new_file = Path(store.index[key]["safetensors_file"])
    assert new_file.parent.name.startswith("owl-pruned-")
    assert new_file.parent.parent == tmp_path / "offload"
    # norms are unchanged, so their entries still point at the original checkpoint
    norm_key = "model.layers.1.input_layernorm.weight"
    assert Path(store.index[norm_key]["safetensors_file"]).resolve() == (checkpoint / "model.safetensors").resolve()
    # save_pretrained reads offloaded weights through the index: the saved model is pruned
    out = tmp_path / "saved"
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    masks = _masks(model)
    for name, keep in masks.items():
        w = reloaded.get_submodule(name).weight
        assert torch.equal(w != 0, keep), name
    assert _sha256(checkpoint) == before


def test_explicit_offload_folder(checkpoint, calib, tmp_path):
    model = _load_offloaded(checkpoint, tmp_path / "offload")
    target = tmp_path / "pruned-store"
    OWLPruner(_config(offload_folder=str(target))).prune(model, dataset=calib)
    files = sorted(p.name for p in target.iterdir())
    assert "model.layers.3.mlp.down_proj.weight.safetensors" in files
    assert not any(f.startswith("model.layers.0.") for f in files)  # RAM blocks are pruned in place


def test_offload_folder_never_overwrites_indexed_file(checkpoint, calib, tmp_path):
    model = _load_offloaded(checkpoint, tmp_path / "offload")
    store = model.model.layers[1].self_attn.q_proj._hf_hook.weights_map.dataset
    key = "model.layers.1.self_attn.q_proj.weight"
    # pretend the index reads this weight from a file inside the folder we are asked to write to
    target = tmp_path / "busy"
    target.mkdir()
    victim = target / f"{key}.safetensors"
    from safetensors.torch import save_file

    save_file({key: store[key]}, str(victim))
    store.index[key] = {"safetensors_file": str(victim), "weight_name": key, "dtype": "float32"}
    digest = hashlib.sha256(victim.read_bytes()).hexdigest()
    with pytest.raises(OWLConfigError, match="offload_folder"):
        OWLPruner(_config(offload_folder=str(target))).prune(model, dataset=calib)
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest


def test_device_option_moves_one_block_at_a_time(checkpoint, calib, monkeypatch):
    ref = AutoModelForCausalLM.from_pretrained(checkpoint)
    OWLPruner(_config()).prune(ref, dataset=calib)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    seen: list[tuple[int, str]] = []
    original = BlockOffloader._moved

    import contextlib

    @contextlib.contextmanager
    def spy(block, device):
        with original(block, device):
            seen.append((id(block), str(next(block.parameters()).device)))
            yield

    monkeypatch.setattr(BlockOffloader, "_moved", staticmethod(spy))
    OWLPruner(_config(device="cpu")).prune(model, dataset=calib)
    assert len(seen) >= NUM_LAYERS and all(dev == "cpu" for _, dev in seen)
    ref_masks, masks = _masks(ref), _masks(model)
    assert all(torch.equal(ref_masks[k], masks[k]) for k in ref_masks)


def test_device_rejected_for_dispatched_model(checkpoint, calib, tmp_path):
    model = _load_offloaded(checkpoint, tmp_path / "offload")
    with pytest.raises(OWLConfigError, match="device"):
        OWLPruner(_config(device="cpu")).prune(model, dataset=calib)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_device_cuda_without_cuda(checkpoint, calib):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with pytest.raises(OWLConfigError, match="CUDA is not available"):
        OWLPruner(_config(device="cuda:0")).prune(model, dataset=calib)


def test_config_validation():
    with pytest.raises(OWLConfigError, match="device"):
        OWLPrunerConfig(device="not-a-device")
    with pytest.raises(OWLConfigError, match="offload_folder"):
        OWLPrunerConfig(offload_folder=3)
    cfg = OWLPrunerConfig(device="auto", offload_folder=Path("/tmp/x"))
    assert cfg.offload_folder == "/tmp/x"
    assert OWLPrunerConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------------- planning
def test_plan_block_devices_multi_gpu():
    device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": 1,
        "model.layers.3": "cuda:1",
        "model.layers.4": "cpu",
        "model.layers.5": "disk",
        "model.norm": 1,
        "lm_head": 1,
    }
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert main_device(device_map) == cuda0
    # cpu / disk blocks execute on the main device, like Accelerate's dispatch_model
    assert plan_block_devices(device_map, "model.layers", 6) == [cuda0, cuda0, cuda1, cuda1, cuda0, cuda0]
    # a parent entry covers its blocks; the deepest entry wins; split blocks run where their first part is
    assert plan_block_devices({"": 1}, "model.layers", 2) == [cuda1, cuda1]
    assert plan_block_devices({"model": 0, "model.layers.1": 1}, "model.layers", 2) == [cuda0, cuda1]
    split = {"model.layers.0.self_attn": 1, "model.layers.0.mlp": 0, "model.layers.1": 0}
    assert plan_block_devices(split, "model.layers", 2) == [cuda1, cuda0]
    with pytest.raises(OWLConfigError, match="no entry"):
        plan_block_devices({"model.layers.0": 0}, "model.layers", 2)
    # CPU-only maps run everything on CPU
    assert plan_block_devices(DEVICE_MAP, "model.layers", NUM_LAYERS) == [torch.device("cpu")] * NUM_LAYERS


def test_plan_matches_dispatched_hooks(checkpoint, tmp_path):
    model = _load_offloaded(checkpoint, tmp_path / "offload")
    path, blocks, _ = get_blocks_and_units(model)
    plan = plan_block_devices(model.hf_device_map, path, len(blocks))
    offloader = BlockOffloader(model)
    for i, block in enumerate(blocks):
        with offloader(i, block):
            assert module_device(block) == plan[i]
            assert all(p.device == plan[i] for p in block.parameters())


def test_multi_gpu_hooks_planning_on_meta():
    """Blocks hooked for two (fake) GPUs: the runner's device for each block is the one planned from the map."""
    from accelerate import init_empty_weights
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=64)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                  "model.layers.3": "disk", "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    plan = plan_block_devices(device_map, "model.layers", 4)
    for i, block in enumerate(model.model.layers):
        value = device_map[f"model.layers.{i}"]
        exec_device = 0 if value == "disk" else value
        add_hook_to_module(block, AlignDevicesHook(execution_device=exec_device, io_same_device=True), append=False)
        assert module_device(block) == plan[i]


def test_prune_on_load_with_disk_offload(checkpoint, calib, tmp_path):
    """`from_pretrained(..., device_map with disk, quantization_config=OWLPrunerConfig)` prunes through the store."""
    import optimum_owl.integration  # noqa: F401  (registers the "owl" quantizer)

    before = _sha256(checkpoint)
    ref = AutoModelForCausalLM.from_pretrained(checkpoint)
    OWLPruner(_config()).prune(ref, dataset=calib)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"), quantization_config=_config(dataset=calib)
    )
    assert model.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    ref_masks, masks = _masks(ref), _masks(model)
    assert all(torch.equal(ref_masks[k], masks[k]) for k in ref_masks)
    assert _sha256(checkpoint) == before


def test_in_memory_offload_store(checkpoint, calib):
    """`accelerate.cpu_offload`: weights kept in a dict store (the path a GPU main device uses for "cpu" modules)."""
    from accelerate import cpu_offload

    ref = AutoModelForCausalLM.from_pretrained(checkpoint)
    OWLPruner(_config()).prune(ref, dataset=calib)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    cpu_offload(model, execution_device=torch.device("cpu"))
    store = model.model.layers[2].mlp.up_proj._hf_hook.weights_map
    original = store["weight"].clone()
    assert model.model.layers[2].mlp.up_proj.weight.device.type == "meta"
    OWLPruner(_config()).prune(model, dataset=calib)
    ref_masks, masks = _masks(ref), _masks(model)
    assert all(torch.equal(ref_masks[k], masks[k]) for k in ref_masks)
    assert not torch.equal(store["weight"], original)  # the store entry was replaced by the pruned tensor
    ids = calib[:2]
    assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
