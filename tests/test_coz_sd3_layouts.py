"""Every file layout a ComfyUI user has for SD3 medium and its text encoders.

tests/tiny_sd3.write_layouts writes one tiny SD3 (fp16-valued weights) as the diffusers folder, the four
sd3_medium*.safetensors checkpoints, clip_l / clip_g and the three t5xxl files, each in its published key
layout and dtype. Every layout must give the diffusers folder's outputs (fp32: <= 1e-5; an fp8 file: the
folder with that file's dequantised weights, in fp32), and every file the pack does not know is refused by
name with what is wrong and the fix. Loading peaks near the network's own bytes (a subprocess measures it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_sd3
from dreamforge_upscale.runtime.errors import UpscalerError
from dreamforge_upscale.upscalers.coz_sd3 import TokenizerDirs
from dreamforge_upscale.upscalers.coz_sd3.components import load_diffusers_folder
from dreamforge_upscale.upscalers.coz_sd3.prompt import encode_prompt
from dreamforge_upscale.upscalers.coz_sd3.single_file import build_clip, build_t5, is_sd3_checkpoint, load_single_files

CPU = torch.device("cpu")
PROMPTS = ("a red fox in the snow, detailed fur", "")
SCALED = "t5xxl_fp8_e4m3fn_scaled.safetensors"
CLIPS = ("clip_l.safetensors", "clip_g.safetensors")


def dirs() -> TokenizerDirs:
    return TokenizerDirs(tiny_sd3.clip_tokenizer_dir(), tiny_sd3.t5_tokenizer_dir())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    return tiny_sd3.write_layouts(tmp_path_factory.mktemp("sd3-layouts"))


@pytest.fixture(scope="module")
def folder(layouts):
    return load_diffusers_folder(layouts["folder"], dirs())


@pytest.fixture(scope="module")
def expected(layouts, folder):
    """The diffusers folder's outputs, computed once: networks, and embeddings per T5 source (None: no T5)."""
    cache: dict = {"networks": networks(folder)}

    def embeddings_with(t5_source):
        if t5_source not in cache:
            ref = dataclasses.replace(folder, t5=layouts["t5_reference"][t5_source] if t5_source else None,
                                      tokenizers={**folder.tokenizers,
                                                  "t5": folder.tokenizers["t5"] if t5_source else None})
            cache[t5_source] = embeddings(ref)
        return cache[t5_source]
    cache["embeddings"] = embeddings_with
    return cache


def embeddings(comps) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.inference_mode():
        return [encode_prompt(comps, p, CPU, tiny_sd3.JOINT) for p in PROMPTS]


def networks(comps) -> dict[str, torch.Tensor]:
    """The transformer's v and the VAE's posterior mean and decode on fixed inputs (fp32)."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 16, 8, 8, generator=gen)
    seq, pooled = torch.randn(1, 20, tiny_sd3.JOINT, generator=gen), torch.randn(1, 80, generator=gen)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    with torch.inference_mode():
        return {"v": comps.transformer(hidden_states=z, timestep=torch.tensor([1000.0]), encoder_hidden_states=seq,
                                       pooled_projections=pooled).sample,
                "mean": comps.vae.encode(x).latent_dist.mean, "decoded": comps.vae.decode(z).sample}


def assert_close(ours, ref, tol=1e-5):
    for (s, p), (rs, rp) in zip(ours, ref):
        assert s.shape == rs.shape and p.shape == rp.shape
        assert (s - rs).abs().max() <= tol and (p - rp).abs().max() <= tol


# ------------------------------------------------------------------------------ every layout, same model
CASES = {  # id: (checkpoint, {role: text file})
    "sd3_medium+clips+t5xxl_fp16": ("sd3_medium.safetensors", {"t5": "t5xxl_fp16.safetensors"}),
    "sd3_medium+clips+t5xxl_fp8_e4m3fn": ("sd3_medium.safetensors", {"t5": "t5xxl_fp8_e4m3fn.safetensors"}),
    "sd3_medium+clips+t5xxl_fp8_e4m3fn_scaled": ("sd3_medium.safetensors", {"t5": SCALED}),
    "sd3_medium+clips, no t5": ("sd3_medium.safetensors", {}),
    "incl_clips+t5xxl_fp16": ("sd3_medium_incl_clips.safetensors", {"t5": "t5xxl_fp16.safetensors"}),
    "incl_clips+t5xxl_fp8_e4m3fn_scaled": ("sd3_medium_incl_clips.safetensors", {"t5": SCALED}),
    "incl_clips, no t5": ("sd3_medium_incl_clips.safetensors", {}),
    "incl_clips_t5xxlfp16": ("sd3_medium_incl_clips_t5xxlfp16.safetensors", {}),
    "incl_clips_t5xxlfp8": ("sd3_medium_incl_clips_t5xxlfp8.safetensors", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_gives_the_diffusers_folders_outputs(layouts, expected, case):
    checkpoint, text = CASES[case]
    files = {role: layouts[f] for role, f in text.items()}
    if checkpoint == "sd3_medium.safetensors":
        files.update(clip_l=layouts["clip_l.safetensors"], clip_g=layouts["clip_g.safetensors"])
    comps = load_single_files(layouts[checkpoint], files, dirs())
    t5_source = text.get("t5") or (checkpoint if "t5xxl" in checkpoint else None)
    assert (comps.t5 is None) == (t5_source is None)
    assert_close(embeddings(comps), expected["embeddings"](t5_source))
    for key, value in networks(comps).items():
        assert (value - expected["networks"][key]).abs().max() <= 1e-5, key
    assert [f["part"] for f in comps.files] == ["checkpoint", *[r for r in ("clip_l", "clip_g", "t5") if r in files]]
    assert comps.files[0]["file"] == checkpoint and all(len(f["sha256"]) == 64 for f in comps.files)


def test_the_files_are_in_the_published_key_layouts_and_dtypes(layouts):
    base = load_file(str(layouts["sd3_medium.safetensors"]))
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in base)
    assert {v.dtype for v in base.values()} == {torch.float16}
    fp8 = load_file(str(layouts["sd3_medium_incl_clips_t5xxlfp8.safetensors"]))
    t5_inside = {k: v for k, v in fp8.items() if k.startswith(tiny_sd3.T5_PREFIX)}
    assert t5_inside and {v.dtype for v in t5_inside.values()} == {torch.float8_e4m3fn}
    assert {v.dtype for k, v in fp8.items() if k.startswith("text_encoders.clip_")} == {torch.float16}
    clip_l = load_file(str(layouts["clip_l.safetensors"]))
    assert "text_projection.weight" not in clip_l and "text_projection.weight" in load_file(str(layouts["clip_g.safetensors"]))
    plain = load_file(str(layouts["t5xxl_fp8_e4m3fn.safetensors"]))
    assert plain["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float8_e4m3fn
    assert plain["encoder.final_layer_norm.weight"].dtype == torch.float16
    scaled = load_file(str(layouts[SCALED]))
    assert scaled["scaled_fp8"].dtype == torch.float8_e4m3fn and scaled["scaled_fp8"].numel() == 0
    scales = [k for k in scaled if k.endswith(".scale_weight")]
    assert len(scales) == 7 * 2 and all(scaled[k].dtype == torch.float32 and scaled[k].dim() == 0 for k in scales)
    assert any(k.endswith(".scale_input") for k in scaled)


def test_scaled_fp8_gives_the_dequantised_weights_and_the_old_loader_did_not(layouts):
    raw = load_file(str(layouts[SCALED]))
    t5 = build_t5(layouts[SCALED])
    own = t5.state_dict()
    for layer in (k[: -len(".scale_weight")] for k in raw if k.endswith(".scale_weight")):
        expected = raw[f"{layer}.weight"].to(torch.float32) * raw[f"{layer}.scale_weight"]
        assert torch.equal(own[f"{layer}.weight"], expected), layer  # exactly comfy/ops.py's convert_weight
    assert torch.equal(own["shared.weight"], raw["shared.weight"].float())
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    # what the loader did before: drop the marker, upcast, ignore scale_weight -> weights hundreds of times too large
    old = {k: v.float() for k, v in raw.items() if k != "scaled_fp8" and not k.endswith((".scale_weight", ".scale_input"))}
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert old[q].abs().max() / own[q].abs().max() > 50
    reference = layouts["t5_reference"][SCALED]
    old_t5 = tiny_sd3.t5_from(reference, old)
    ids = torch.arange(12)[None]
    with torch.inference_mode():
        good, bad, ref = t5(ids)[0], old_t5(ids)[0], reference(ids)[0]
    assert (good - ref).abs().max() <= 1e-5 and (bad - ref).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_text_encoders_load_straight_into_the_compute_dtype(layouts, dtype):
    """Each tensor converted once from the file (fp8: dequantised in fp32, then the dtype)."""
    for file in tiny_sd3.T5_FILES:
        t5 = build_t5(layouts[file], dtype=dtype)
        ref = layouts["t5_reference"][file].state_dict()
        for k, v in t5.state_dict().items():
            want = torch.float32 if dtype == torch.float16 and ".wo." in k else dtype  # as transformers keeps T5's wo
            assert v.dtype == want and torch.equal(v, ref[k].to(want)), (file, k)
    clip_g = build_clip(layouts["clip_g.safetensors"], "clip_g", dtype=dtype)
    assert {p.dtype for p in clip_g.parameters()} == {dtype}
    assert clip_g.text_model.embeddings.position_ids.tolist() == [list(range(77))]


def test_checkpoint_networks_load_in_their_own_dtypes(layouts, folder):
    comps = load_single_files(layouts["sd3_medium_incl_clips_t5xxlfp8.safetensors"], {}, dirs(),
                              dtypes=(torch.bfloat16, torch.float32, torch.float16))
    assert {p.dtype for p in comps.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in comps.vae.parameters()} == {torch.float32}
    assert {p.dtype for m in (comps.clip_l, comps.clip_g) for p in m.parameters()} == {torch.float16}
    assert {n for n, p in comps.t5.named_parameters() if p.dtype != torch.float16} == {
        n for n, _ in comps.t5.named_parameters() if ".wo." in n}  # fp32, as from_pretrained keeps T5's wo
    ref = folder.transformer.state_dict()
    assert all(torch.equal(v, ref[k].to(torch.bfloat16)) for k, v in comps.transformer.state_dict().items())
    in_folder = load_diffusers_folder(layouts["folder"], dirs(), dtypes=(torch.bfloat16, torch.float32, torch.float16))
    assert {p.dtype for p in in_folder.transformer.parameters()} == {torch.bfloat16}
    assert {(n, p.dtype) for n, p in in_folder.t5.named_parameters()} == {
        (n, p.dtype) for n, p in comps.t5.named_parameters()}  # the folder's T5 in the same dtypes


# ------------------------------------------------------------------------------ refusals
def _write_raw(path: Path, entries: dict[str, tuple[str, tuple, bytes]], metadata: dict | None = None) -> Path:
    """A safetensors file written by hand (for dtypes torch cannot save, and damaged headers)."""
    header, data = {}, b""
    for key, (dtype, shape, blob) in entries.items():
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _edited(layouts, tmp_path, file: str, edit, name: str | None = None, metadata=None) -> Path:
    sd = load_file(str(layouts[file]))
    edit(sd)
    path = tmp_path / (name or file)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _refused(call, *fragments):
    with pytest.raises(UpscalerError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


T5_FIX = "use t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors or t5xxl_fp8_e4m3fn_scaled.safetensors"


def test_unknown_t5_files_are_refused_by_name(layouts, tmp_path):
    t5 = lambda path: build_t5(path)  # noqa: E731
    gguf = tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    _refused(lambda: t5(gguf), gguf.name, "is a GGUF file", "does not load GGUF", T5_FIX)
    renamed = tmp_path / "t5xxl_q8.bin"
    renamed.write_bytes(b"GGUF" + bytes(64))
    _refused(lambda: t5(renamed), renamed.name, "is a GGUF file")

    whole = layouts["t5xxl_fp16.safetensors"].read_bytes()
    cut = tmp_path / "t5xxl_fp16_partial.safetensors"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    _refused(lambda: t5(cut), cut.name, "is truncated", "did not finish", "re-download")
    header_cut = tmp_path / "t5xxl_fp16_header_cut.safetensors"
    header_cut.write_bytes(whole[:100])
    _refused(lambda: t5(header_cut), header_cut.name, "is truncated", "its header alone needs")
    garbage = tmp_path / "t5xxl_garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    _refused(lambda: t5(garbage), garbage.name, "is not a safetensors file", "Re-download")
    empty = tmp_path / "t5xxl_empty.safetensors"
    empty.write_bytes(b"")
    _refused(lambda: t5(empty), empty.name, "is empty (0 bytes)")
    _refused(lambda: t5(tmp_path / "nowhere.safetensors"), "model file not found", "nowhere.safetensors",
             "models/text_encoders")

    def weight_scale(sd):  # fp8 with per-layer weight_scale (ComfyUI mixed precision / diffusers), no marker
        sd["encoder.block.0.layer.0.SelfAttention.q.weight_scale"] = torch.tensor(0.01)
    path = _edited(layouts, tmp_path, "t5xxl_fp8_e4m3fn.safetensors", weight_scale, "t5xxl_fp8_weight_scale.safetensors")
    _refused(lambda: t5(path), path.name, "SelfAttention.q.weight_scale", "weight_scale", "does not load", T5_FIX)
    path = _edited(layouts, tmp_path, "t5xxl_fp8_e4m3fn.safetensors", lambda sd: None, "t5xxl_mixed.safetensors",
                   metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {}})})
    _refused(lambda: t5(path), path.name, "ComfyUI's mixed-precision format", T5_FIX)

    def absmax(sd):  # bitsandbytes nf4 bookkeeping beside a weight
        sd["encoder.block.0.layer.1.DenseReluDense.wo.weight.absmax"] = torch.ones(4)
    path = _edited(layouts, tmp_path, "t5xxl_fp16.safetensors", absmax, "t5xxl_nf4.safetensors")
    _refused(lambda: t5(path), path.name, "bitsandbytes 4-bit", T5_FIX)

    def int8(sd):
        sd["encoder.block.1.layer.0.SelfAttention.k.weight"] = torch.zeros_like(
            sd["encoder.block.1.layer.0.SelfAttention.k.weight"], dtype=torch.int8)
    path = _edited(layouts, tmp_path, "t5xxl_fp16.safetensors", int8, "t5xxl_int8.safetensors")
    _refused(lambda: t5(path), path.name, "SelfAttention.k.weight is stored as I8", "does not load", T5_FIX)

    sd = load_file(str(layouts["t5xxl_fp16.safetensors"]))
    entries = {k: ({torch.float16: "F16"}[v.dtype], tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
               for k, v in sd.items()}
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    entries[q] = ("F8_E8M0", entries[q][1], bytes(int(np.prod(entries[q][1]))))
    path = _write_raw(tmp_path / "t5xxl_e8m0.safetensors", entries)
    _refused(lambda: t5(path), path.name, f"{q} is stored as F8_E8M0", T5_FIX)


def test_scaled_fp8_variants_comfyui_does_not_write_are_refused(layouts, tmp_path):
    q = "encoder.block.0.layer.0.SelfAttention.q"
    cases = {
        "t5xxl_no_marker.safetensors": (lambda sd: sd.pop("scaled_fp8"), "but no scaled_fp8 marker"),
        "t5xxl_per_channel.safetensors": (
            lambda sd: sd.__setitem__(f"{q}.scale_weight", torch.ones(sd[f"{q}.weight"].shape[0])),
            "not one scalar per layer: another scaled format"),
        "t5xxl_scaled_embedding.safetensors": (
            lambda sd: sd.__setitem__("shared.scale_weight", torch.tensor(0.5)), "which is not a Linear layer of T5"),
        "t5xxl_scaled_fp16_weight.safetensors": (
            lambda sd: sd.__setitem__(f"{q}.weight", sd[f"{q}.weight"].to(torch.float16)),
            f"the Linear weight {q}.weight is F16: not a layout ComfyUI writes"),
        "t5xxl_bf16_marker.safetensors": (
            lambda sd: sd.__setitem__("scaled_fp8", torch.empty(0, dtype=torch.bfloat16)), "marker is BF16"),
    }
    for name, (edit, fragment) in cases.items():
        path = _edited(layouts, tmp_path, SCALED, edit, name)
        _refused(lambda: build_t5(path), name, fragment, T5_FIX)


def test_files_of_another_model_or_part_are_refused(layouts, tmp_path):
    ck = layouts["sd3_medium.safetensors"]
    both = {"clip_l": layouts["clip_l.safetensors"], "clip_g": layouts["clip_g.safetensors"]}
    _refused(lambda: load_single_files(ck, {**both, "t5": layouts["clip_g.safetensors"]}, dirs()),
             "clip_g.safetensors was chosen as the T5-XXL text encoder but it is a CLIP text encoder",
             "choose t5xxl_fp16.safetensors")
    _refused(lambda: load_single_files(ck, {**both, "clip_l": layouts["t5xxl_fp16.safetensors"]}, dirs()),
             "t5xxl_fp16.safetensors was chosen as the CLIP-L text encoder but it is a T5 encoder",
             "choose clip_l.safetensors")
    _refused(lambda: load_single_files(ck, {"clip_l": both["clip_g"], "clip_g": both["clip_l"]}, dirs()),
             "clip_l.safetensors: it has no text_projection", "looks like a CLIP-L file",
             "choose clip_g.safetensors for clip_g")
    projected = _edited(layouts, tmp_path, "clip_l.safetensors", lambda sd: sd.__setitem__(
        "text_projection.weight", torch.eye(tiny_sd3.CLIP_L, dtype=torch.float16)), "clip_l_projected.safetensors")
    _refused(lambda: load_single_files(ck, {"clip_l": both["clip_g"], "clip_g": projected}, dirs()),
             "look swapped", "clip_g.safetensors, width 48", "choose clip_l.safetensors for clip_l")
    _refused(lambda: load_single_files(ck, {"clip_l": both["clip_g"], "clip_g": both["clip_g"]}, dirs()),
             "do not make the transformer's pooled input (80)", "choose clip_l.safetensors and clip_g.safetensors")
    _refused(lambda: load_single_files(layouts["clip_g.safetensors"], {}, dirs()),
             "clip_g.safetensors is not a Stable Diffusion 3 checkpoint", "it is a CLIP text encoder",
             "needs sd3_medium.safetensors")
    _refused(lambda: load_single_files(ck, {"clip_g": both["clip_g"]}, dirs()),
             "sd3_medium.safetensors has no CLIP-L text encoder: put clip_l.safetensors")

    def open_clip(sd):
        sd["transformer.resblocks.0.ln_1.weight"] = torch.ones(4)
    path = _edited(layouts, tmp_path, "clip_g.safetensors", open_clip, "clip_g_open_clip.safetensors")
    _refused(lambda: build_clip(path, "clip_g"), path.name, "open_clip's layout", "use clip_g.safetensors")
    path = _edited(layouts, tmp_path, "clip_l.safetensors",
                   lambda sd: sd.__setitem__("scaled_fp8", torch.empty(0, dtype=torch.float8_e4m3fn)),
                   "clip_l_fp8_scaled.safetensors")
    _refused(lambda: build_clip(path, "clip_l"), path.name, "scaled fp8 layout", "T5-XXL only", "use clip_l.safetensors")
    path = _edited(layouts, tmp_path, "t5xxl_fp16.safetensors",
                   lambda sd: sd.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"), "t5xxl_missing.safetensors")
    _refused(lambda: build_t5(path), path.name, "the T5 weights are incomplete (1 tensors missing, e.g. "
             "encoder.block.1.layer.1.DenseReluDense.wo.weight)", "re-download")
    path = _edited(layouts, tmp_path, "clip_g.safetensors",
                   lambda sd: sd.__setitem__("text_projection.weight", torch.zeros(48, 40, dtype=torch.float16)),
                   "clip_g_bad.safetensors")
    _refused(lambda: build_clip(path, "clip_g"), path.name, "CLIP-G tensor text_projection.weight has shape (48, 40), "
             "expected (48, 48)")


def test_damaged_or_foreign_checkpoints_are_refused_by_name(layouts, tmp_path):
    ck = layouts["sd3_medium_incl_clips.safetensors"]
    cut = tmp_path / "sd3_medium_incl_clips.safetensors"
    data = ck.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    assert is_sd3_checkpoint(cut)  # listed, so that loading it says what is wrong
    _refused(lambda: load_single_files(cut, {}, dirs()), cut.name, "is truncated", "re-download")
    prefix = "model.diffusion_model."
    path = _edited(layouts, tmp_path, "sd3_medium_incl_clips.safetensors",
                   lambda sd: sd.pop(prefix + "joint_blocks.1.x_block.mlp.fc2.weight"), "sd3_medium_damaged.safetensors")
    _refused(lambda: load_single_files(path, {}, dirs()), path.name, "the transformer weights are incomplete",
             "joint_blocks.1.x_block.mlp.fc2.weight", "re-download")
    path = _edited(layouts, tmp_path, "sd3_medium_incl_clips.safetensors",
                   lambda sd: sd.__setitem__(prefix + "joint_blocks.0.x_block.mlp.fc1.scale_weight", torch.tensor(1.0)),
                   "sd3_medium_fp8_scaled.safetensors")
    _refused(lambda: load_single_files(path, {}, dirs()), path.name, "joint_blocks.0.x_block.mlp.fc1.scale_weight",
             "ComfyUI's scaled fp8", "use sd3_medium.safetensors")
    path = _edited(layouts, tmp_path, "sd3_medium_incl_clips.safetensors",
                   lambda sd: sd.pop("first_stage_model.decoder.conv_out.weight"), "sd3_medium_no_vae_out.safetensors")
    _refused(lambda: load_single_files(path, {}, dirs()), path.name, "the VAE weights are incomplete",
             "decoder.conv_out.weight")


# ------------------------------------------------------------------------------ memory
PROBE = r"""
import gc, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import pack_import; pack_import.install()
import torch
torch.set_num_threads(1)
from transformers import T5Config, T5EncoderModel
from dreamforge_upscale.upscalers.coz_sd3.single_file import build_t5
with torch.device("meta"):  # import and warm up everything but the load itself
    T5EncoderModel(T5Config(vocab_size=8, d_model=8, num_heads=1, d_kv=8, d_ff=8, num_layers=1,
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
gc.collect()
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets VmHWM to the current RSS
start = status("VmRSS:")
model = build_t5(sys.argv[3], dtype=getattr(torch, sys.argv[4]))
peak = status("VmHWM:")
print(json.dumps({"peak": peak - start, "network": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""
SMALL_CONSTANT = 16 << 20  # staging buffers and allocator slack


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable VmHWM")
def test_building_t5_from_an_fp16_file_peaks_near_the_networks_bytes(tmp_path):
    """A 42 M-parameter T5 (ComfyUI's fp16 layout, 83 MB): the load peaks at <= 1.2x the network in its compute
    dtype (+ 16 MiB), in fp32 (each tensor widened once) and fp16 (read straight in; `wo` widened). A random
    init and a load of `.float()` copies peaked at 5.0x the file (2.5x the fp32 network)."""
    path = tmp_path / "t5xxl_fp16.safetensors"
    params = tiny_sd3.write_t5_file(path, d_model=512, layers=6, d_ff=2048)
    tests, scripts = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "scripts"
    wo = 6 * 2048 * 512  # T5's feed-forward outputs stay fp32 in an fp16 T5 (as transformers loads it)
    # a fresh process per dtype (freed memory would hide the next peak), the two side by side
    runs = {name: subprocess.Popen([sys.executable, "-c", PROBE, str(tests), str(scripts), str(path), name],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("float32", "float16")}
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        m = json.loads(stdout.strip().splitlines()[-1])
        size = torch.empty(0, dtype=getattr(torch, name)).element_size()
        assert m["network"] == params * size + (wo * 2 if name == "float16" else 0)
        assert m["peak"] <= 1.2 * m["network"] + SMALL_CONSTANT, (name, m)


# ------------------------------------------------------------------------------ through ComfyUI
def test_single_file_and_separate_encoders_through_comfyui(comfy, layouts):
    """sd3_medium.safetensors + clip_l (models/text_encoders) + clip_g (models/clip) + t5xxl_fp8_e4m3fn_scaled
    (models/text_encoders) picked in Load Chain-of-Zoom Model; one loop step equals the backend's outside ComfyUI
    on the same files, and the receipt names each file."""
    from example_workflows import COZ_LORA_FOLDER, install_tiny_coz_sd3
    from test_comfyui_integration import Graph, out, unique
    from test_comfyui_zoom import as_tensor, input_pil, saved, text_of

    from dreamforge_upscale.upscalers.coz_sd3 import CoZSD3Upscaler
    from dreamforge_upscale.zoom import ZoomSettings, zoom_loop

    models = comfy.base / "models"
    install_tiny_coz_sd3(models)  # the LoRA files in models/loras/chain-of-zoom
    where = {"sd3_medium.safetensors": models / "checkpoints" / "layouts", "clip_l.safetensors": models / "text_encoders"
             / "layouts", "clip_g.safetensors": models / "clip" / "layouts", SCALED: models / "text_encoders" / "layouts"}
    for file, folder in where.items():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(layouts[file], folder / file)
    lora = models / "loras" / COZ_LORA_FOLDER
    g = Graph()
    img = g.add("LoadImage", image="coffee_64.png")
    model = g.add("DreamForgeLoadCoZModel", base_model="checkpoints/layouts/sd3_medium.safetensors",
                  transformer_lora=f"{COZ_LORA_FOLDER}/model_20001.pkl", vae_lora=f"{COZ_LORA_FOLDER}/vae_encoder_20001.pt",
                  clip_l="layouts/clip_l.safetensors", clip_g="layouts/clip_g.safetensors", t5xxl=f"layouts/{SCALED}",
                  dtype="auto")
    loop = g.add("DreamForgeCoZLoop", image=out(img), upscaler=out(model), steps=1, mode="recursive_multiscale",
                 process_size=64, prompt="a cup of coffee", color_fix="wavelet", seed=3, tile=0)
    s = g.add("SaveImage", images=out(loop), filename_prefix=unique("coz_sd3_layouts"))
    r = g.add("PreviewAny", source=out(loop, 2))
    entry = comfy.run(g.nodes, timeout=300)
    states = saved(comfy, entry, s)
    backend = json.loads(text_of(entry, r))["step_receipts"][0]["upscale"]["passes"][0]["backend"]
    parts = {f["part"]: f["file"] for f in backend["model_files"]}
    assert parts["checkpoint"] == "sd3_medium.safetensors" and parts["t5"] == SCALED
    assert (parts["clip_l"], parts["clip_g"]) == CLIPS and backend["networks"]["t5"] == "fp32"
    ours = CoZSD3Upscaler.load(where["sd3_medium.safetensors"] / "sd3_medium.safetensors", lora / "model_20001.pkl",
                               lora / "vae_encoder_20001.pt", device=CPU, tokenizer_dirs=dirs(),
                               text_files={"clip_l": where["clip_l.safetensors"] / "clip_l.safetensors",
                                           "clip_g": where["clip_g.safetensors"] / "clip_g.safetensors",
                                           "t5": where[SCALED] / SCALED})
    result = zoom_loop(ours, as_tensor(input_pil(comfy, "coffee_64.png")), 1,
                       ZoomSettings(mode="recursive_multiscale", process_size=64, user_prompt="a cup of coffee", seed=3))
    assert len(states) == 2
    for a, b in zip(states, result.states[0]):
        assert np.abs(a.astype(np.int16) - np.asarray(b, np.int16)).max() <= 1
