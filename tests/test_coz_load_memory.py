"""Before a Chain-of-Zoom load: what it will need, from the headers, against the free memory.

The plan counts each network's elements from the files the loaders will read (every published layout); a
load that would not fit is refused with the numbers and the fixes before any tensor is read; dtype auto
lowers the text encoders (then the transformer) to bf16 when fp32 does not fit, and the receipt says so.
"""
from __future__ import annotations

import psutil
import pytest
import torch

import tiny_sd3
from dreamforge_upscale.tiling.memory import host_free_bytes
from dreamforge_upscale.runtime.errors import UpscalerError
from dreamforge_upscale.upscalers.coz_sd3 import CoZSD3Upscaler, TokenizerDirs
from dreamforge_upscale.upscalers.coz_sd3.memory_plan import plan_load
from dreamforge_upscale.upscalers.loading import SafetensorsFile

CPU = torch.device("cpu")
FP32 = (torch.float32,) * 3


def dirs() -> TokenizerDirs:
    return TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coz-load-memory")
    layouts = tiny_sd3.write_layouts(root)
    return {**layouts, "lora": tiny_sd3.write_lora_files(root / "loras")}


def load(files, free_ram, t5="t5xxl_fp16.safetensors", dtype="auto", base="sd3_medium.safetensors"):
    text = {"clip_l": files["clip_l.safetensors"], "clip_g": files["clip_g.safetensors"],
            "t5": files[t5] if t5 else None}
    return CoZSD3Upscaler.load(files[base], files["lora"]["transformer"], files["lora"]["vae"], text_files=text,
                               tokenizer_dirs=dirs(), use_t5=bool(t5), dtype=dtype, device=CPU, free_ram=free_ram)


def plan_of(files, use_t5=True):
    return plan_load(files["sd3_medium.safetensors"], {"clip_l": files["clip_l.safetensors"], "clip_g":
                     files["clip_g.safetensors"], "t5": files["t5xxl_fp16.safetensors"]}, use_t5=use_t5)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("base, t5", [("folder", None), ("sd3_medium.safetensors", "t5xxl_fp16.safetensors"),
                                      ("sd3_medium.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
                                      ("sd3_medium_incl_clips_t5xxlfp16.safetensors", None)])
def test_the_plan_counts_what_the_loaders_hold(files, base, t5):
    text = {"t5": files[t5]} if t5 else {}
    if base == "sd3_medium.safetensors":
        text.update(clip_l=files["clip_l.safetensors"], clip_g=files["clip_g.safetensors"])
    plan = plan_load(files[base], text, use_t5=True)
    model = CoZSD3Upscaler.load(files[base], files["lora"]["transformer"], files["lora"]["vae"], text_files=text,
                                tokenizer_dirs=dirs(), device=CPU)
    held = {"transformer": model.comps.transformer, "vae": model.comps.vae, "clip_l": model.comps.clip_l,
            "clip_g": model.comps.clip_g, "t5": model.comps.t5}
    assert set(plan.elements) == {k for k, m in held.items() if m is not None}
    for role, n in plan.elements.items():  # files may carry a few tensors the network does not keep (ids, ties)
        assert abs(n - params(held[role])) <= 0.05 * params(held[role]), (role, n, params(held[role]))
    assert plan.transformer_width == model.comps.transformer.config.num_attention_heads * \
        model.comps.transformer.config.attention_head_dim
    assert plan.vae_width == model.comps.vae.config.block_out_channels[0]
    assert model.load_memory["estimated_gb"] > 0 and model.load_memory["note"] is None  # the tiny model fits


def test_a_load_that_does_not_fit_is_refused_before_any_tensor_is_read(files, monkeypatch):
    plan = plan_of(files)
    bf16_need = plan.need_bytes((torch.bfloat16, torch.float32, torch.bfloat16))

    def read(*args, **kwargs):
        raise AssertionError("a tensor was read before the memory check")

    monkeypatch.setattr(SafetensorsFile, "read", read)
    with pytest.raises(UpscalerError) as err:
        load(files, free_ram=bf16_need - 1)
    text = str(err.value)
    assert "Loading Chain-of-Zoom's model needs about" in text and "are free: nothing was loaded" in text
    assert "T5-XXL" in text and "set t5xxl to none" in text and "more RAM" in text
    with pytest.raises(UpscalerError) as err:  # an explicit dtype is never changed: refused, auto offered
        load(files, free_ram=plan.need_bytes(FP32) - 1, dtype="fp32")
    assert "dtype auto (text encoders, then the transformer, in bf16 as needed" in str(err.value)


def test_auto_lowers_the_text_encoders_then_the_transformer_to_fit(files):
    plan = plan_of(files)
    text_bf16 = (torch.float32, torch.float32, torch.bfloat16)
    assert plan.need_bytes(text_bf16) < plan.need_bytes(FP32)
    model = load(files, free_ram=plan.need_bytes(text_bf16))
    assert model.networks() == {"transformer": "fp32", "vae": "fp32", "clip_l": "bf16", "clip_g": "bf16", "t5": "bf16"}
    assert model.comps.t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
    note = model.load_memory["note"]
    assert note.startswith("CLIP-L, CLIP-G, T5-XXL in bf16 (dtype auto)") and "were free" in note
    all_bf16 = load(files, free_ram=plan.need_bytes((torch.bfloat16, torch.float32, torch.bfloat16)))
    assert all_bf16.networks()["transformer"] == "bf16" and "transformer" in all_bf16.load_memory["note"]
    from dreamforge_upscale.upscalers import UpscaleRequest, upscale

    _, receipt = upscale(model, torch.rand(1, 16, 16, 3), UpscaleRequest(seed=0))
    backend = receipt.to_dict()["passes"][0]["backend"]
    assert note in receipt.notes and backend["load_memory"]["note"] == note


def test_without_t5_the_plan_leaves_it_out(files):
    with_t5 = plan_of(files)
    without = plan_of(files, use_t5=False)
    assert "t5" in with_t5.elements and "t5" not in without.elements
    assert without.need_bytes(FP32) < with_t5.need_bytes(FP32)


def test_host_free_memory_honours_a_container_limit(tmp_path):
    assert host_free_bytes(str(tmp_path / "none")) > 0  # no cgroup files: the OS's figure
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text(str(900 * 2**20))
    (tmp_path / "memory.stat").write_text(f"anon 1\ninactive_file {100 * 2**20}\n")
    assert host_free_bytes(str(tmp_path)) == 2**30 - 800 * 2**20  # reclaimable page cache is not counted as used
    (tmp_path / "memory.max").write_text("max\n")
    assert host_free_bytes(str(tmp_path)) >= 0.8 * psutil.virtual_memory().available  # no limit: the OS's figure
