"""Teacher loading and encoding, checked against the transformers models themselves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.preprocess import Preprocessing
from pipeline.teacher import Teacher, TeacherError
from pipeline.testing import make_tiny_teacher

SIZE = 56  # 4x4 patches of 14 px


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {fam: make_tiny_teacher(root / fam, fam, image_size=SIZE)
            for fam in ("internvl", "siglip", "dinov2_registers", "clip")}


def _frames(b=2, t=4, size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, t, size, size, 3), dtype=np.uint8)


def _pixels(teacher, frames):
    return teacher.preprocessing.to_pixel_values(torch.as_tensor(frames).flatten(0, 1))


def _hf_vision(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


@pytest.mark.parametrize("family,prefix", [("siglip", 0), ("dinov2_registers", 5), ("clip", 1)])
def test_vision_model_tokens_match_transformers(teachers, family, prefix):
    teacher = Teacher.from_pretrained(teachers[family])
    frames = _frames()
    out = teacher.encode(frames)
    assert out.shape == (2, 4, 4, 4, 32) and out.dtype == torch.float32
    assert teacher.grid == (4, 4) and teacher.dim == 32
    model = _hf_vision(teachers[family])
    if family == "clip":
        model = model.vision_model
    with torch.no_grad():
        ref = model(pixel_values=_pixels(teacher, frames)).last_hidden_state
    # CLS (and DINOv2's 4 registers) dropped, the rest reshaped row-major to the patch grid.
    assert ref.shape[1] == 16 + prefix
    torch.testing.assert_close(out.reshape(8, 16, 32), ref[:, prefix:], rtol=1e-5, atol=1e-5)


def test_layer_choice_matches_hidden_states_and_changes_output(teachers):
    path = teachers["dinov2_registers"]
    frames = _frames()
    last = Teacher.from_pretrained(path).encode(frames)
    first = Teacher.from_pretrained(path, layer=1)
    out1 = first.encode(frames)
    assert len(first._layers()) == 1, "blocks after the chosen layer must be removed, not computed"
    with torch.no_grad():
        ref = _hf_vision(path)(pixel_values=_pixels(first, frames), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out1.reshape(8, 16, 32), ref[1][:, 5:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out1, last, atol=1e-3)
    # -2 counts back from the end: hidden_states[-2] of a 2-layer model is hidden_states[1].
    torch.testing.assert_close(Teacher.from_pretrained(path, layer=-2).encode(frames), out1)
    with pytest.raises(TeacherError, match="out of range"):
        Teacher.from_pretrained(path, layer=3)


def test_internvl_vlm_loads_vision_tower_and_projector_only(teachers):
    from transformers import InternVLForConditionalGeneration

    path = teachers["internvl"]
    frames = _frames()
    vlm = InternVLForConditionalGeneration.from_pretrained(path).eval()
    pixels = _pixels(Teacher.from_pretrained(path), frames)

    plain = Teacher.from_pretrained(path)
    assert plain.family == "internvl_vision" and plain.projector is None
    n_vision = sum(p.numel() for p in vlm.model.vision_tower.parameters())
    assert sum(p.numel() for p in plain.parameters()) == n_vision
    with torch.no_grad():
        ref = vlm.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(plain.encode(frames).reshape(8, 16, 32), ref, rtol=1e-5, atol=1e-5)

    proj = Teacher.from_pretrained(path, head="projector")
    out = proj.encode(frames)
    # 4x4 patches of 32 -> pixel shuffle 0.5 -> 2x2 of 128 -> projector -> LLM width 48.
    assert out.shape == (2, 4, 2, 2, 48) and proj.grid == (2, 2) and proj.dim == 48
    with torch.no_grad():
        ref = vlm.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(out.reshape(8, 4, 48), ref, rtol=1e-5, atol=1e-5)
    desc = proj.describe()
    assert (desc["head"], desc["dim"], desc["grid"], desc["family"], desc["layer"]) == (
        "projector", 48, [2, 2], "internvl_vision", -1)
    json.dumps(desc)  # goes into store.json


def test_vlm_checkpoint_without_llm_weights_and_sharded_with_other_prefix(teachers, tmp_path):
    """Only vision keys are read: a checkpoint whose LLM tensors are absent still loads, from shards
    whose keys carry another prefix (transformers' 'model.vision_tower.' layout)."""
    src = teachers["internvl"]
    state = load_file(str(src / "model.safetensors"))
    kept = {("model." + k): v for k, v in state.items() if not k.startswith("language_model.")}
    names = sorted(kept)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: kept[k].contiguous() for k in keys}, str(tmp_path / fname))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((src / name).read_text())

    frames = _frames(1, 2)
    for head in ("none", "projector"):
        ref = Teacher.from_pretrained(src, head=head).encode(frames)
        torch.testing.assert_close(Teacher.from_pretrained(tmp_path, head=head).encode(frames), ref)

    del weight_map[names[0]]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(TeacherError, match="lacks 1 of"):
        Teacher.from_pretrained(tmp_path, head="projector")


def test_projector_head_needs_a_vlm(teachers):
    with pytest.raises(TeacherError, match="InternVL-style"):
        Teacher.from_pretrained(teachers["siglip"], head="projector")


def test_preprocessing_read_from_preprocessor_config(teachers, tmp_path):
    src = teachers["siglip"]
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    cfg = {"size": {"height": 84, "width": 84}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.25, 0.125],
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    teacher = Teacher.from_pretrained(tmp_path)
    assert teacher.image_size == 84 and teacher.grid == (6, 6)
    assert teacher.image_mean == (0.1, 0.2, 0.3) and teacher.image_std == (0.5, 0.25, 0.125)
    frames = _frames(1, 2, size=84)
    pixels = teacher.preprocessing.to_pixel_values(frames)
    expected = (torch.as_tensor(frames).permute(0, 1, 4, 2, 3).double() / 255
                - torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)) / torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1)
    torch.testing.assert_close(pixels.double(), expected, rtol=1e-6, atol=1e-5)
    # SigLIP's 56 px position embeddings are interpolated to the 84 px config size.
    assert teacher.encode(frames).shape == (1, 2, 6, 6, 32)
    # Flags win over the file.
    over = Teacher.from_pretrained(tmp_path, image_size=56, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert over.image_size == 56 and over.image_mean == (0.5, 0.5, 0.5) and over.grid == (4, 4)
    # CLIP-style processors: the model input is the centre-crop size, not the resize edge.
    clip = Preprocessing.from_config({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                                      "do_center_crop": True})
    assert clip.size == (224, 224)


def test_frames_not_at_image_size_are_resized(teachers):
    teacher = Teacher.from_pretrained(teachers["siglip"])
    frames = _frames(1, 2, size=SIZE)
    big = np.repeat(np.repeat(frames, 2, axis=2), 2, axis=3)  # 112 px, each pixel doubled
    out = teacher.encode(big)
    assert out.shape == (1, 2, 4, 4, 32)
    assert torch.isfinite(out).all()


def test_batching_does_not_change_results(teachers):
    frames = _frames(3, 4, seed=1)
    whole = Teacher.from_pretrained(teachers["internvl"], head="projector")
    chunked = Teacher.from_pretrained(teachers["internvl"], head="projector", batch_size=5)
    torch.testing.assert_close(chunked.encode(frames), whole.encode(frames), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        whole.encode(frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        whole.encode(frames[0])


def test_siglip2_naflex_patches_match_transformers(tmp_path):
    path = make_tiny_teacher(tmp_path / "siglip2", "siglip2", image_size=SIZE)
    teacher = Teacher.from_pretrained(path)
    assert teacher.image_size == SIZE and teacher.grid == (4, 4) and teacher.family == "siglip2_vision_model"
    frames = _frames(1, 2)
    out = teacher.encode(frames)
    pixels = _pixels(teacher, frames)
    # Independent patchify: patch (i, j) flattened as (row, column, channel), rows of patches first.
    patches = torch.stack([torch.stack([pixels[n, :, i * 14:(i + 1) * 14, j * 14:(j + 1) * 14].permute(1, 2, 0)
                                        .reshape(-1) for i in range(4) for j in range(4)]) for n in range(2)])
    with torch.no_grad():
        ref = _hf_vision(path)(pixel_values=patches, pixel_attention_mask=torch.ones(2, 16, dtype=torch.int32),
                               spatial_shapes=torch.tensor([[4, 4], [4, 4]])).last_hidden_state
    torch.testing.assert_close(out.reshape(2, 16, 32), ref, rtol=1e-5, atol=1e-5)


def test_attention_backend_choice_keeps_outputs(teachers):
    frames = _frames(1, 2)
    default = Teacher.from_pretrained(teachers["siglip"]).encode(frames)
    math_only = Teacher.from_pretrained(teachers["siglip"], attention_backends=("math",))
    torch.testing.assert_close(math_only.encode(frames), default, rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherError, match="unknown attention backends"):
        Teacher.from_pretrained(teachers["siglip"], attention_backends=("fast",))


def test_llava_vlm_loads_clip_tower_only_at_its_feature_layer(tmp_path):
    from transformers import LlavaForConditionalGeneration

    path = make_tiny_teacher(tmp_path / "llava", "llava", image_size=SIZE)
    vlm = LlavaForConditionalGeneration.from_pretrained(path).eval()
    teacher = Teacher.from_pretrained(path, layer=vlm.config.vision_feature_layer)   # LLaVA uses -2
    assert teacher.family == "clip_vision_model" and len(teacher._layers()) == 1
    assert sum(p.numel() for p in teacher.parameters()) < sum(p.numel() for p in vlm.model.vision_tower.parameters())
    frames = _frames(1, 2)
    with torch.no_grad():
        ref = vlm.model.vision_tower(pixel_values=_pixels(teacher, frames),
                                     output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(teacher.encode(frames).reshape(2, 16, 32), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TeacherError, match="InternVL-style"):
        Teacher.from_pretrained(path, head="projector")


def test_concurrent_encode_calls_keep_their_own_outputs(teachers):
    """Two threads (a Ray actor with max_concurrency=2) on one teacher, intermediate layer included."""
    from concurrent.futures import ThreadPoolExecutor

    teacher = Teacher.from_pretrained(teachers["dinov2_registers"], layer=1)
    inputs = [_frames(2, 4, seed=s) for s in range(6)]
    alone = [teacher.encode(x) for x in inputs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(teacher.encode, inputs))
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a)
