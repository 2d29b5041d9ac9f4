"""DAPE / RAM tag prompts with tiny random checkpoints in the published layouts (tests/tiny_ram.py).

Checked against computations written here, not against the pack's own modules: the Swin through
timm's own checkpoint filter, the tagging head and the LoRA branch (unmerged, as loralib runs it in
training) in plain tensor operations, the input through torchvision's transforms.
"""
from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from dreamforge_upscale.upscalers import UpscalerError
from dreamforge_upscale.zoom import ZoomSettings, make_prompt, zoom_loop
from dreamforge_upscale.zoom.prompts import compose_prompt
from dreamforge_upscale.zoom.tagger import TaggerProvider, TagOptions, Vocabulary, ram_vocabulary, select, tagger_dtype
from dreamforge_upscale.zoom.tagger.tags import DATA_DIR
import tiny_ram
from tiny_ram import IMAGE_SIZE, dape_state_dict, ram_state_dict, save_tiny_dape, save_tiny_ram
from zoom_helpers import BicubicX4

SCALE = 1 / 8  # loralib: lora_alpha 1 / r 8


def photo(y: int, x: int, side: int = 96) -> Image.Image:
    return Image.fromarray(data.astronaut()[y:y + side, x:x + side])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ram")
    ram = save_tiny_ram(d / "ram_swin_large_14m.pth")
    return {"dir": d, "ram": ram, "dape": save_tiny_dape(d / "DAPE.pth", ram)}


@pytest.fixture(scope="module")
def plain(files):
    return TaggerProvider.load(files["ram"])


@pytest.fixture(scope="module")
def dape(files):
    return TaggerProvider.load(files["ram"], files["dape"])


@pytest.fixture(scope="module")
def published():
    """The tiny checkpoint's published state dict (what save_tiny_ram wrote), for the references."""
    return ram_state_dict()


# ------------------------------------------------------------------------------ references
def reference_pixels(image: Image.Image) -> torch.Tensor:
    from torchvision import transforms

    t = transforms.Compose([transforms.ToTensor(), transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)),
                            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return t(image.convert("RGB"))[None]


def reference_tokens(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """RAM's Swin output via timm's own loader for original-layout Swin weights."""
    import timm
    from timm.models.swin_transformer import checkpoint_filter_fn

    swin = timm.create_model("swin_large_patch4_window12_384", pretrained=False, num_classes=0,
                             img_size=IMAGE_SIZE, **tiny_ram.SWIN).eval()
    own = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    own = {k: v for k, v in checkpoint_filter_fn(own, swin).items() if not k.startswith("head.")}
    swin.load_state_dict(own, strict=True)
    with torch.no_grad():
        x = swin.forward_features(pixels).flatten(1, 2)
    return torch.cat([x.mean(1, keepdim=True), x], 1)


def reference_logits(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """RAM's tagging path in plain tensor ops, from the published keys (4 heads, eps 1e-12, erf GELU)."""
    def lin(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-12)

    memory = lin(tokens, "image_proj")[0]
    h = torch.relu(lin(sd["label_embed"], "wordvec_proj"))
    for i in range(tiny_ram.LAYERS):
        p = f"vision_multi.encoder.layer.{i}."
        q, k, v = (lin(x, p + "crossattention.self." + n) for x, n in ((h, "query"), (memory, "key"), (memory, "value")))
        heads = [torch.softmax(qh @ kh.T / math.sqrt(qh.shape[-1]), -1) @ vh
                 for qh, kh, vh in zip(q.chunk(4, -1), k.chunk(4, -1), v.chunk(4, -1))]
        a = norm(lin(torch.cat(heads, -1), p + "crossattention.output.dense") + h, p + "crossattention.output.LayerNorm")
        h = norm(lin(F.gelu(lin(a, p + "intermediate.dense")), p + "output.dense") + a, p + "output.LayerNorm")
    return lin(h, "fc").squeeze(-1)[None]


class UnmergedLora(torch.nn.Module):
    """loralib's training-time forward: base(x) + LoRA branch * scale, never merged into the weight."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, q_and_v: bool):
        super().__init__()
        self.base, self.a, self.b, self.q_and_v = base, a, b, q_and_v

    def forward(self, x):
        r = self.b.shape[1]
        if not self.q_and_v:
            return self.base(x) + (x @ self.a.T @ self.b.T) * SCALE
        d = self.base.out_features // 3
        q = x @ self.a[:r].T @ self.b[:d].T
        v = x @ self.a[r:].T @ self.b[d:].T
        return self.base(x) + torch.cat([q, torch.zeros_like(q), v], -1) * SCALE


def logits(provider: TaggerProvider, image: Image.Image) -> torch.Tensor:
    return torch.logit(provider.probabilities([image]).double())


# ------------------------------------------------------------------------------ data
def test_vocabulary_is_rams_4585_tags_with_per_class_thresholds():
    vocab = ram_vocabulary()
    assert len(vocab) == 4585 and len(set(vocab.tags)) == 4585
    assert vocab.tags[:3] == ("3D CG rendering", "3D glasses", "abacus") and vocab.tags[-1] == "zoo"
    t = vocab.thresholds
    assert t.dtype == torch.float32 and float(t.min()) == pytest.approx(0.45) and int((t >= 1.0).sum()) == 10
    assert len(set(t.tolist())) > 20  # really per class, not one global threshold
    notice = (DATA_DIR / "NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and "recognize-anything" in notice
    assert "Apache License" in (DATA_DIR / "LICENSE-Apache-2.0").read_text()


# ------------------------------------------------------------------------------ model
def test_published_layout_loads_and_matches_an_independent_forward(plain, published):
    image = photo(0, 150)
    pixels = reference_pixels(image)
    ours = plain.model(pixels)
    expected = reference_logits(published, reference_tokens(published, pixels))
    assert torch.allclose(ours, expected, atol=2e-4, rtol=1e-4), (ours - expected).abs().max()
    # the provider's own preprocessing (PIL -> antialiased bilinear -> ImageNet norm) is torchvision's
    assert torch.allclose(plain.probabilities([image]), torch.sigmoid(expected), atol=1e-4)
    # the logits depend on the image, and the label queries were computed once at load
    assert (logits(plain, photo(300, 20)) - logits(plain, image)).abs().max() > 0.5
    q = plain.model.label_queries
    assert q.shape == (4585, tiny_ram.HIDDEN) and not any("label_embed" in k for k in plain.model.state_dict())


def test_dape_merge_equals_the_unmerged_lora_computation(files, dape, published):
    unmerged = TaggerProvider.load(files["ram"])  # a private copy: its modules get LoRA branches below
    lora = dape_state_dict(published)
    model, wrapped = unmerged.model, 0
    for key in lora:
        if not key.endswith(".lora_A") or key.startswith("tag_encoder."):
            continue
        module = key[: -len(".lora_A")]
        a, b = lora[key], lora[module + ".lora_B"]
        parent, _, leaf = module.rpartition(".")
        parent_module = model.get_submodule(parent)  # qkv / query / key keep their names in the pack
        setattr(parent_module, leaf, UnmergedLora(getattr(parent_module, leaf), a, b, q_and_v=leaf == "qkv"))
        wrapped += 1
    assert wrapped == 4 + 4 == len(dape.info.lora_merged)  # 4 Swin blocks (depths 2, 2) + 2 layers x (query, key)
    for image in (photo(0, 150), photo(250, 300)):
        merged, reference = logits(dape, image), logits(unmerged, image)
        assert torch.allclose(merged, reference, atol=1e-4), (merged - reference).abs().max()
        assert dape.tags([image]) == unmerged.tags([image])
    # ...and LoRA matters: plain RAM answers differently
    assert (logits(dape, photo(0, 150)) - logits(TaggerProvider.load(files["ram"]), photo(0, 150))).abs().max() > 0.1


def test_lora_touches_only_q_and_v_rows_of_qkv(plain, dape):
    for name in ("visual_encoder.layers.0.blocks.1.attn.qkv.weight", "visual_encoder.layers.1.blocks.0.attn.qkv.weight"):
        base, merged = plain.model.state_dict()[name], dape.model.state_dict()[name]
        d = base.shape[0] // 3
        assert torch.equal(base[d:2 * d], merged[d:2 * d])  # K untouched
        assert not torch.equal(base[:d], merged[:d]) and not torch.equal(base[2 * d:], merged[2 * d:])
    head = "tagging_head.encoder.layer.1.crossattention.self."
    assert torch.equal(plain.model.state_dict()[head + "value.weight"], dape.model.state_dict()[head + "value.weight"])
    assert not torch.equal(plain.model.state_dict()[head + "key.weight"], dape.model.state_dict()[head + "key.weight"])


def test_same_input_same_tags_and_fp32_on_cpu(files, dape):
    image = photo(100, 200)
    first = dape.probabilities([image])
    assert torch.equal(dape.probabilities([image]), first)
    assert torch.equal(TaggerProvider.load(files["ram"], files["dape"]).probabilities([image]), first)
    assert dape.describe([image]) == dape.describe([image], seed=5)  # nothing sampled
    assert dape.model.fc.weight.dtype == torch.float32
    assert tagger_dtype("auto", torch.device("cpu")) == torch.float32
    assert tagger_dtype("auto", torch.device("cuda")) == torch.float16  # the reference's precision for DAPE
    with pytest.raises(UpscalerError, match="dtype must be one of"):
        tagger_dtype("fp8", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_agrees_with_fp32(files, dape):
    gpu = TaggerProvider.load(files["ram"], files["dape"], dtype=torch.float16)
    gpu.model.to("cuda")
    image = photo(100, 200)
    p16 = gpu.probabilities([image])
    assert gpu.model.fc.weight.dtype == torch.float16 and p16.dtype == torch.float32
    assert torch.allclose(p16, dape.probabilities([image]), atol=2e-2)
    assert torch.equal(gpu.probabilities([image]), p16)  # deterministic on the GPU too


# ------------------------------------------------------------------------------ tags and prompt
def test_thresholds_are_strict_and_per_class(dape):
    image = photo(0, 150)
    p = dape.probabilities([image])[0]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(p), 40, replace=False)
    t = torch.ones(len(p))  # everything else off
    at, below = picks[:20], picks[20:]
    t[at] = p[at]  # equal: must not fire (strictly greater)
    t[below] = torch.nextafter(p[below], torch.zeros(len(below)))  # one float below: fires
    vocab = Vocabulary(dape.vocabulary.tags, t)
    tagger = TaggerProvider(dape.model, vocab, TagOptions(), dape.name, dape.info)
    expected = [dape.vocabulary.tags[i] for i in sorted(below)]
    assert tagger.tags([image])[0] == expected  # only those, in tag-list order
    # the real per-class list: exactly the classes above their own threshold
    real = dape.vocabulary.thresholds
    assert select(p, dape.vocabulary) == [i for i in range(len(p)) if p[i] > real[i] and real[i] < 1]


def test_prompt_format_is_the_published_one(dape):
    image = photo(0, 150)
    tags = dape.tags([image])[0]
    assert tags, "the tiny model should fire some tags on this crop"
    order = [dape.vocabulary.tags.index(t) for t in tags]
    assert order == sorted(order)
    joined = ", ".join(tags)
    assert make_prompt(dape, [image], "") == (joined, joined)
    assert make_prompt(dape, [image], "sharp photo") == (f"{joined}, sharp photo,", joined)
    # nothing fires: "" alone, ", P," with a user prompt (as the reference formats it)
    silent = dape.with_options(TagOptions(threshold_offset=1.0))
    assert make_prompt(silent, [image], "") == ("", "")
    assert make_prompt(silent, [image], "P") == (", P,", "")
    assert compose_prompt("a, b", "P") == "a, b, P,"


def test_multiscale_tags_only_the_zoomed_view(dape):
    context, view = photo(0, 0, 256), photo(0, 150)
    assert dape.describe([context, view]) == dape.describe([view]) != dape.describe([context])


def test_options_max_drop_keep_offset(dape):
    vocab = dape.vocabulary
    image = photo(250, 300)
    p = dape.probabilities([image])[0]
    fired = select(p, vocab)
    assert len(fired) >= 4
    top = sorted(fired, key=lambda i: -float(p[i]))[:3]
    assert select(p, vocab, TagOptions(max_tags=3)) == sorted(top)  # the most probable, in tag-list order
    never = next(i for i in range(len(p)) if i not in fired)
    options = TagOptions.parse(vocab, drop_tags=f"{vocab.tags[fired[0]].upper()}, ", keep_tags=vocab.tags[never])
    assert options.drop == (fired[0],) and options.keep == (never,)
    assert select(p, vocab, options) == sorted(set(fired) - {fired[0]} | {never})
    more = select(p, vocab, TagOptions(threshold_offset=-0.2))
    assert set(fired) < set(more)
    assert not set(more) & set(np.flatnonzero(vocab.thresholds.numpy() >= 1))  # switched-off tags stay off


@pytest.mark.parametrize("kwargs,phrase", [
    ({"max_tags": -1}, "max_tags must be 0"),
    ({"threshold_offset": 1.5}, "threshold_offset must be between"),
    ({"drop_tags": "astronot"}, r"drop_tags: 'astronot' \(did you mean astronaut"),
    ({"keep_tags": "zzzz"}, "keep_tags: 'zzzz' not in RAM's tag list"),
    ({"drop_tags": "sky", "keep_tags": "Sky"}, "sky is in both drop_tags and keep_tags"),
])
def test_bad_options_are_refused(kwargs, phrase):
    with pytest.raises(UpscalerError, match=phrase):
        TagOptions.parse(ram_vocabulary(), **kwargs)


def test_loop_prompts_are_the_views_tags(dape):
    image = torch.from_numpy(data.astronaut()[:256, 100:356].astype(np.float32) / 255)[None]
    result = zoom_loop(BicubicX4(), image, 2, ZoomSettings(mode="recursive", process_size=64, provider=dape,
                                                          user_prompt="astronaut"))
    for n in (1, 2):
        prev = result.states[0][n - 1]
        view = prev.crop((24, 24, 40, 40)).resize((64, 64), Image.Resampling.BICUBIC)
        tags = dape.describe([view])
        receipt = result.receipt.to_dict()["step_receipts"][n - 1]["prompt"]
        assert receipt["generated"] == tags and receipt["provider"] == "dape:ram_swin_large_14m.pth+DAPE.pth"
        assert result.prompts[0][n - 1] == (f"{tags}, astronaut," if tags else ", astronaut,")


# ------------------------------------------------------------------------------ files
def test_other_file_formats_give_the_same_tags(files, dape, tmp_path):
    from safetensors.torch import save_file

    image = photo(0, 150)
    sd = torch.load(files["ram"], weights_only=True)["model"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ram.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)  # not memory-mappable: read whole, still weights only
    for path in (tmp_path / "ram.safetensors", tmp_path / "legacy.pth"):
        other = TaggerProvider.load(path, files["dape"])
        assert all(torch.equal(a, b) for a, b in zip(other.model.state_dict().values(), dape.model.state_dict().values()))
        # the same weights; only memory alignment (SIMD paths) may move a last bit
        assert torch.allclose(other.probabilities([image]), dape.probabilities([image]), rtol=0, atol=1e-6)
        assert other.tags([image]) == dape.tags([image])


def test_dape_base_weights_replace_rams(files, dape, tmp_path):
    lora = torch.load(files["dape"], weights_only=True)
    torch.save({**lora, "fc.bias": torch.tensor([-50.0])}, tmp_path / "dape_full.pth")
    full = TaggerProvider.load(files["ram"], tmp_path / "dape_full.pth")
    assert full.info.dape_weights == ["fc.bias"] and full.tags([photo(0, 150)]) == [[]]


class Payload:
    """Pickles as a call of exec: what a malicious checkpoint would run on an unsafe load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("which", ["ram", "dape"])
def test_a_checkpoint_with_a_pickled_callable_is_refused_and_never_runs(files, tmp_path, which):
    marker = tmp_path / "ran.txt"
    evil = tmp_path / f"evil_{which}.pth"
    sd = torch.load(files[which], weights_only=True)
    torch.save({**sd, "hook": Payload(marker)}, evil)
    args = (evil, None) if which == "ram" else (files["ram"], evil)
    with pytest.raises(UpscalerError, match=r"needs pickled code to load \(builtins\.exec\).*was not loaded"):
        TaggerProvider.load(*args)
    assert not marker.exists()


def test_an_unsupported_class_is_named(files, tmp_path):
    sd = torch.load(files["ram"], weights_only=True)
    torch.save({**sd, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "with_args.pth")
    with pytest.raises(UpscalerError, match=r"ram_model: with_args\.pth needs pickled code to load \(argparse\.Namespace\)"):
        TaggerProvider.load(tmp_path / "with_args.pth")


def _save_model(path, sd):
    torch.save({"model": sd}, path)
    return path


@pytest.mark.parametrize("change,phrase", [
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("vision_multi.")}, "is not a RAM checkpoint"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}, "no Swin visual encoder"),
    (lambda sd: {k: v for k, v in sd.items() if "layers.1.blocks.1.mlp" not in k}, "lacks 4 weights RAM Swin needs"),
    (lambda sd: {**sd, "label_embed": torch.zeros(4585 * 2, tiny_ram.WIDTH)}, r"9170 label embeddings .*RAM\+\+"),
    (lambda sd: {**sd, "fc.weight": torch.zeros(1, 7)}, r"fc.weight has shape \(1, 7\)"),
])
def test_wrong_ram_checkpoints_are_refused(published, tmp_path, change, phrase):
    with pytest.raises(UpscalerError, match=phrase):
        TaggerProvider.load(_save_model(tmp_path / "bad.pth", change(dict(published))))


@pytest.mark.parametrize("change,phrase", [
    (lambda sd: {"tag_encoder.x.lora_A": torch.zeros(8, 4), "tag_encoder.x.lora_B": torch.zeros(4, 8)},
     "has no LoRA .* for RAM's visual encoder or tagging head"),
    (lambda sd: {k: v for k, v in sd.items() if not k.endswith("layers.0.blocks.0.attn.qkv.lora_B")}, "has lora_A but no lora_B"),
    (lambda sd: {**sd, "visual_encoder.layers.0.blocks.0.attn.qkv.lora_A": torch.zeros(16, 99)}, "does not belong to this RAM"),
    (lambda sd: {**sd, "image_proj.weight": torch.zeros(3, 3)}, r"image_proj.weight has shape \(3, 3\)"),
])
def test_wrong_dape_files_are_refused(files, tmp_path, change, phrase):
    lora = torch.load(files["dape"], weights_only=True)
    torch.save(change(lora), tmp_path / "bad_dape.pth")
    with pytest.raises(UpscalerError, match=phrase):
        TaggerProvider.load(files["ram"], tmp_path / "bad_dape.pth")


def test_unreadable_files_are_refused(tmp_path):
    cases = [(f"garbage{i}.pth", "not a PyTorch checkpoint") for i in range(12)]  # each trips the unpickler differently
    for i in range(12):
        (tmp_path / f"garbage{i}.pth").write_bytes(np.random.default_rng(i).bytes(2048))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    cases += [("empty.pth", "holds no weights"), ("bad.safetensors", "not a readable .safetensors"),
              ("missing.pth", "is not a file")]
    for name, phrase in cases:
        with pytest.raises(UpscalerError, match=re.escape(phrase)):
            TaggerProvider.load(tmp_path / name)


def test_no_image_is_refused(dape):
    with pytest.raises(UpscalerError, match="at least one image"):
        dape.describe([])
