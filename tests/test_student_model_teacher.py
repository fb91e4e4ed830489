"""Student initialised from a teacher checkpoint by clipping its weights to the student's shapes."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.testing import make_tiny_teacher
from student import LiteFrameModel, TeacherLayoutError, init_from_teacher, preset_config


def small_student(**overrides) -> LiteFrameModel:
    """Narrower, shallower and with a larger patch grid (112 px) than the 64-wide, 4-layer, 56 px teacher."""
    cfg = dict(hidden_size=32, num_attention_heads=1, intermediate_size=48, num_hidden_layers=3, downsample_after=[1, 2])
    return LiteFrameModel(preset_config("tiny", **{**cfg, **overrides}))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {family: make_tiny_teacher(root / family, family, hidden_size=64, num_layers=4)
            for family in ("internvl", "dinov2", "vit", "clip")}


def test_internvl_vlm_vision_tower_is_clipped_exactly(teachers):
    tensors = load_file(teachers["internvl"] / "model.safetensors")
    model = small_student()
    report = init_from_teacher(model, teachers["internvl"])
    assert report["layout"] == "internvl_vision" and report["prefix"].endswith("vision_tower.")
    t = lambda name: tensors[report["prefix"] + name]  # noqa: E731
    assert report["teacher_layers"] == 4

    assert torch.equal(model.patch_embed.weight, t("embeddings.patch_embeddings.projection.weight")[:32])
    block = model.blocks[2]
    qkv = block.attn.qkv.weight
    assert torch.equal(qkv[:32], t("encoder.layer.2.attention.q_proj.weight")[:32, :32])
    assert torch.equal(qkv[64:], t("encoder.layer.2.attention.v_proj.weight")[:32, :32])
    assert not block.attn.qkv.bias.any()  # this teacher has no q/k/v bias (attention_bias=False)
    assert torch.equal(block.norm2.weight, t("encoder.layer.2.layernorm_after.weight")[:32])
    assert torch.equal(block.mlp.fc1.weight, t("encoder.layer.2.mlp.fc1.weight")[:48, :32])
    # Layer scale folded into the output projections: lambda * (W x + b).
    lam = t("encoder.layer.2.lambda_2")
    assert torch.allclose(block.mlp.fc2.weight, (lam[:, None] * t("encoder.layer.2.mlp.fc2.weight"))[:32, :48])
    assert torch.allclose(block.attn.proj.bias, (t("encoder.layer.2.lambda_1") * t("encoder.layer.2.attention.projection_layer.bias"))[:32])
    # Position table: CLS row dropped, first channels, 4x4 teacher grid resized to the student's 8x8.
    pos = t("embeddings.position_embeddings")[0, 1:, :32].reshape(4, 4, 32)
    assert model.pos_embed.shape == (1, 8, 8, 32)
    assert torch.allclose(model.pos_embed[0].mean((0, 1)), pos.mean((0, 1)), atol=0.05)
    # The student's own parts keep their init.
    assert "blocks.0.temporal.weight" in report["fresh"] and "merges.0.weight" in report["fresh"]
    assert "blocks.0.attn.qkv.weight" in report["copied"]
    assert not model.blocks[0].temporal.weight.any()


def test_same_grid_position_table_is_copied_exactly(teachers):
    model = small_student(image_size=56, downsample_after=[1, 2], downsample_stride=[[2, 2, 2], [2, 1, 1]])
    init_from_teacher(model, teachers["dinov2"])
    pos = load_file(teachers["dinov2"] / "model.safetensors")["embeddings.position_embeddings"]
    assert torch.equal(model.pos_embed[0], pos[0, 1:, :32].reshape(4, 4, 32))


@pytest.mark.parametrize("family,layout", [("dinov2", "dinov2"), ("vit", "vit")])
def test_vit_style_teachers(teachers, family, layout):
    tensors = load_file(teachers[family] / "model.safetensors")
    model = small_student()
    report = init_from_teacher(model, teachers[family])
    assert report["layout"] == layout and report["prefix"] == ""
    assert torch.equal(model.blocks[1].attn.qkv.weight[32:64], tensors["encoder.layer.1.attention.attention.key.weight"][:32, :32])
    assert torch.equal(model.blocks[1].attn.qkv.bias[64:], tensors["encoder.layer.1.attention.attention.value.bias"][:32])
    assert torch.equal(model.head.norm.weight, tensors["layernorm.weight"][:32])
    mlp_in = "mlp.fc1" if family == "dinov2" else "intermediate.dense"
    assert torch.equal(model.blocks[0].mlp.fc1.bias, tensors[f"encoder.layer.0.{mlp_in}.bias"][:48])


def test_unsupported_teachers_are_clear_errors(teachers, tmp_path):
    with pytest.raises(TeacherLayoutError, match="CLIP"):
        init_from_teacher(small_student(), teachers["clip"])
    with pytest.raises(TeacherLayoutError, match="needs 6"):
        init_from_teacher(small_student(num_hidden_layers=6, downsample_after=[2, 4]), teachers["vit"])
    with pytest.raises(TeacherLayoutError, match="patch size"):
        init_from_teacher(small_student(patch_size=16, image_size=128), teachers["vit"])
    with pytest.raises(TeacherLayoutError, match="smaller than the student"):
        init_from_teacher(small_student(hidden_size=128, num_attention_heads=2), teachers["vit"])
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({"backbone.stem.weight": torch.zeros(2, 2)}, odd / "model.safetensors")
    (odd / "config.json").write_text("{}")
    with pytest.raises(TeacherLayoutError, match="unknown vision-model layout"):
        init_from_teacher(small_student(), odd)
    with pytest.raises(TeacherLayoutError, match="no model.safetensors"):
        init_from_teacher(small_student(), tmp_path)
