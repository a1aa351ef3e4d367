"""Students: registry, shapes, padding invariance, init from tiny random teachers, MoME routing, export."""

import json
import re

import pytest
import timm
import torch
from transformers import AutoModel, BertConfig, BertModel, RobertaConfig, RobertaModel

from mmkd_core.errors import MmkdError
from mmkd_core.students import (
    create_student,
    list_students,
    load_exported_vit,
    load_student,
    save_student,
    save_text_student,
)
from mmkd_core.targets import make_targets

V, T_MAX, IMG, PATCH = 50, 16, 16, 8
TEXT = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=V, max_position=T_MAX)
VIT = dict(depth=2, embed_dim=32, num_heads=2, img_size=IMG, patch_size=PATCH)
MM = dict(
    width=32,
    num_heads=2,
    img_size=IMG,
    patch_size=PATCH,
    vocab_size=V,
    max_position=T_MAX,
    image_depth=1,
    text_depth=1,
    shared_depth=2,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_bert(cls=BertModel, config_cls=BertConfig, **kw):
    cfg = config_cls(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=T_MAX + kw.pop("extra_positions", 0),
        **kw,
    )
    return cls._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa", add_pooling_layer=False).eval()


def tiny_vit(**kw):
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=32,
        depth=4,
        num_heads=2,
        **kw,
    ).eval()


def tiny_beit():
    return timm.create_model(
        "beitv2_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=32,
        depth=4,
        num_heads=2,
        use_shared_rel_pos_bias=True,
        use_rel_pos_bias=False,
        use_abs_pos_emb=False,
        global_pool="token",
    ).eval()


def text_batch(b=3, t=9):
    ids = torch.randint(1, V, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return ids * mask, mask  # pad id 0


def images(b=2):
    return torch.randn(b, 3, IMG, IMG)


def teacher_hidden(model, x):
    """Every block's output of a timm model, CLS first."""
    pairs = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)
    return [torch.cat([p, t], 1) for t, p in pairs]


def test_registry_and_config_errors():
    assert {"text", "vit", "beit", "multimodal"} <= set(list_students())
    assert create_student("bert", **TEXT).name == "text"  # alias
    with pytest.raises(MmkdError, match="unknown student"):
        create_student("nope")
    with pytest.raises(MmkdError, match="unknown option"):
        create_student("vit", **VIT, widht=3)
    with pytest.raises(MmkdError, match="token_pred"):
        create_student("text", **TEXT, token_pred="both")
    with pytest.raises(MmkdError, match="vl_depth needs mome"):
        create_student("multimodal", **MM, vl_depth=1)
    with pytest.raises(MmkdError, match="freeze_embeddings"):
        create_student("text", **TEXT, freeze_embeddings=True)
    with pytest.raises(MmkdError, match="num_heads=4 but the init model has 2"):
        create_student("text", depth=2, num_heads=4, init="teacher", init_from=tiny_bert())


@pytest.mark.parametrize("token_pred", ["recipe", "head"])
def test_forward_shapes(token_pred):
    heads = dict(token_pred=token_pred, target_dim=48, pooled_dim=24)
    ids, mask = text_batch()
    out = create_student("text", **TEXT, **heads)(input_ids=ids, attention_mask=mask)
    assert len(out.hidden_states) == 2 and out.tokens.shape == (3, 9, 48) and out.pooled.shape == (3, 24)
    assert out.mask.dtype == torch.bool and out.mask.sum() == mask.sum()
    for name in ("vit", "beit"):
        out = create_student(name, **VIT, **heads)(pixel_values=images())
        assert out.tokens.shape == (2, 5, 48) and out.pooled.shape == (2, 24)
        assert out.hidden_states[1].shape == out.last_hidden_state.shape == (2, 5, 32)
    mm = create_student("multimodal", **MM, **heads, mome=True, vl_depth=1)
    out = mm(pixel_values=images(), input_ids=ids, attention_mask=mask)
    assert out.modality == "image" and out.pooled is out.image.pooled and out.tokens.shape == (2, 5, 48)
    assert out.text.tokens.shape == (3, 9, 48) and len(out.text.hidden_states) == 3
    assert mm.encode_image(images()).shape == (2, 24) and mm.encode_text(ids, mask).shape == (3, 24)
    assert mm(input_ids=ids).image is None


def test_recipe_prediction_is_make_targets_on_own_hidden_states():
    ids, mask = text_batch()
    student = create_student("text", **TEXT, recipe_layers="last:2", layer_norm_targets=False).eval()
    out = student(input_ids=ids, attention_mask=mask)
    expected = make_targets(out.hidden_states, out.mask, [0, 1], layer_norm_targets=False)
    torch.testing.assert_close(out.tokens, expected, rtol=0, atol=0)
    vit = create_student("vit", **VIT, target_dim=48, recipe_layers=1).eval()  # widths differ: linear head
    out = vit(pixel_values=images())
    expected = vit.heads.token_head(make_targets(out.hidden_states, out.mask, [1]))
    torch.testing.assert_close(out.tokens, expected, rtol=0, atol=0)


def _assert_padding_invariant(run, ids, mask):
    full = run(ids, mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        alone = run(ids[b : b + 1, :n], mask[b : b + 1, :n])
        torch.testing.assert_close(full.pooled[b : b + 1], alone.pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(full.tokens[b : b + 1, :n], alone.tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(full.last_hidden_state[b : b + 1, :n], alone.last_hidden_state, atol=1e-5, rtol=0)


def test_text_padding_does_not_change_outputs():
    ids, mask = text_batch()
    text = create_student("text", **TEXT, pool="mean").eval()
    _assert_padding_invariant(lambda i, m: text(input_ids=i, attention_mask=m), ids, mask)
    mm = create_student("multimodal", **MM, mome=True, vl_depth=1, token_pred="head", text_pool="mean").eval()
    _assert_padding_invariant(lambda i, m: mm(input_ids=i, attention_mask=m), ids, mask)


def test_text_init_copies_first_layers_and_freezes_embeddings():
    teacher = tiny_bert()
    student = create_student("text", depth=2, init="teacher", init_from=teacher, freeze_embeddings=True).eval()
    assert student.config.hidden_size == 32 and student.init_info["blocks"] == [0, 1]
    for i in range(2):
        for (k, a), b in zip(
            student.bert.encoder.layer[i].state_dict().items(),
            teacher.encoder.layer[i].state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b), k
    ids, mask = text_batch()
    want = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:3]
    got = student(input_ids=ids, attention_mask=mask).hidden_states
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g[mask.bool()], w[mask.bool()], atol=1e-5, rtol=0)
    # every second layer, on request; "ends" is block 0 and the top ones
    other = create_student("text", depth=2, init="teacher", init_from=teacher, init_blocks=[1, 3])
    assert torch.equal(other.bert.encoder.layer[1].output.dense.weight, teacher.encoder.layer[3].output.dense.weight)
    ends = create_student("text", depth=2, init="teacher", init_from=teacher, init_blocks="ends")
    top = len(teacher.encoder.layer) - 1
    assert ends.init_info["blocks"] == [0, top]
    assert torch.equal(ends.bert.encoder.layer[1].output.dense.weight, teacher.encoder.layer[top].output.dense.weight)

    frozen = student.frozen_tables()
    before = [t.weight.detach().clone() for t in frozen]
    assert not any(t.weight.requires_grad for t in frozen)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    out = student(input_ids=ids, attention_mask=mask)
    (out.tokens.square().mean() + out.pooled.square().mean()).backward()
    opt.step()
    for t, b in zip(frozen, before, strict=True):
        assert torch.equal(t.weight, b)
    assert not torch.equal(student.bert.embeddings.LayerNorm.weight, teacher.embeddings.LayerNorm.weight)


def test_text_init_from_roberta_is_a_roberta_with_its_position_offset():
    teacher = tiny_bert(RobertaModel, RobertaConfig, pad_token_id=1, type_vocab_size=1, extra_positions=2)
    student = create_student("text", depth=2, init="pretrained", init_from=teacher).eval()
    assert type(student.bert) is RobertaModel
    assert student.config.max_position == T_MAX and student.config.position_offset == 2
    ids = torch.randint(3, V, (2, 7))
    want = teacher(input_ids=ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(student(input_ids=ids).hidden_states[1], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "beit"])
def test_image_init_copies_first_blocks(kind):
    teacher = tiny_vit() if kind == "vit" else tiny_beit()
    student = create_student(kind, depth=2, init="pretrained", init_from=teacher).eval()
    src = teacher.state_dict()
    for key, value in student.model.state_dict().items():
        assert torch.equal(value, src[key]), key  # first k blocks keep their indices
    if kind == "beit":
        assert "rel_pos_bias.relative_position_bias_table" in student.model.state_dict()
    x = images()
    got, want = student(pixel_values=x).hidden_states, teacher_hidden(teacher, x)
    assert len(got) == 2 and len(want) > 2
    for g, w in zip(got, want[:2], strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_beit_init_from_a_teacher_checkpoint_by_name(tmp_path):
    # an exported 4-block beit student is a timm hub directory, which the beitv2 teacher reads
    source = create_student("beit", **dict(VIT, depth=4)).eval()
    save_student(source, tmp_path)
    student = create_student("beit", depth=2, init="pretrained", init_from="beitv2", init_weights=str(tmp_path))
    assert student.init_info["source"]["teacher"]["name"] == "beitv2"
    assert torch.equal(student.model.blocks[1].attn.qkv.weight, source.model.blocks[1].attn.qkv.weight)
    assert torch.equal(
        student.model.rel_pos_bias.relative_position_bias_table, source.model.rel_pos_bias.relative_position_bias_table
    )


def test_vit_init_resamples_position_embedding_for_another_size():
    student = create_student("vit", depth=1, img_size=2 * IMG, init="pretrained", init_from=tiny_vit())
    assert student.model.pos_embed.shape == (1, 17, 32)


def test_mome_routes_each_modality_to_its_expert():
    mm = create_student("multimodal", **MM, mome=True, vl_depth=1).eval()
    x, (ids, mask) = images(), text_batch()
    base = mm(pixel_values=x, input_ids=ids, attention_mask=mask)
    first, last = mm.shared_blocks
    assert set(first.experts) == {"image", "text"} and set(last.experts) == {"vl"}
    # expert zeroed -> (image output unchanged, text output unchanged)
    for expert, same in (("text", (True, False)), ("image", (False, True)), ("vl", (False, False))):
        block = first if expert != "vl" else last
        saved = {k: v.clone() for k, v in block.experts[expert].state_dict().items()}
        with torch.no_grad():
            block.experts[expert].mlp.fc2.weight.zero_()
            block.experts[expert].mlp.fc2.bias.fill_(1.0)
        out = mm(pixel_values=x, input_ids=ids, attention_mask=mask)
        image_same = torch.equal(out.image.pooled, base.image.pooled)
        text_same = torch.equal(out.text.pooled, base.text.pooled)
        assert (image_same, text_same) == same, expert
        block.experts[expert].load_state_dict(saved)


@pytest.mark.parametrize("image_kind", ["vit", "beit"])
def test_multimodal_init_from_unimodal_models(image_kind):
    image_model = tiny_vit() if image_kind == "vit" else tiny_beit()
    text_model = tiny_bert()
    mm = create_student(
        "multimodal",
        image_depth=1,
        text_depth=2,
        shared_depth=2,
        mome=True,
        vl_depth=1,
        init="pretrained",
        image_init_from=image_model,
        text_init_from=text_model,
    ).eval()
    assert mm.config.width == 32 and mm.config.text_num_heads == 2
    x = images()
    ids = torch.randint(1, V, (2, 7))
    # the towers reproduce their sources' first blocks (BEiT's relative position bias cannot be carried over)
    if image_kind == "vit":
        torch.testing.assert_close(
            mm(pixel_values=x).hidden_states[0], teacher_hidden(image_model, x)[0], atol=1e-5, rtol=0
        )
    else:
        assert torch.equal(mm.pos_embed, torch.zeros_like(mm.pos_embed))
        assert torch.equal(mm.image_blocks[0].attn.qkv.weight, image_model.blocks[0].attn.qkv.weight)
    want = text_model(input_ids=ids, output_hidden_states=True).hidden_states[1:3]
    for g, w in zip(mm(input_ids=ids).hidden_states[:2], want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    # shared block 0: attention and image expert from image block 1, text expert from BERT layer 2
    block, layer = mm.shared_blocks[0], text_model.encoder.layer[2]
    assert torch.equal(block.attn.proj.weight, image_model.blocks[1].attn.proj.weight)
    assert torch.equal(block.experts["image"].mlp.fc1.weight, image_model.blocks[1].mlp.fc1.weight)
    assert torch.equal(block.experts["text"].mlp.fc1.weight, layer.intermediate.dense.weight)
    assert torch.equal(block.experts["text"].norm.weight, layer.attention.output.LayerNorm.weight)
    assert torch.equal(mm.shared_blocks[1].experts["vl"].mlp.fc2.weight, image_model.blocks[2].mlp.fc2.weight)
    if image_kind == "beit":
        assert torch.equal(block.ls1.gamma, image_model.blocks[1].gamma_1)
        assert torch.equal(block.attn.qkv.bias[32:64], torch.zeros(32))  # BEiT has no k bias


def test_text_export_loads_with_transformers(tmp_path):
    student = create_student("text", **TEXT, target_dim=48).eval()
    save_text_student(student, tmp_path)
    meta = json.loads((tmp_path / "mmkd_student.json").read_text())
    assert meta["student"] == "text" and meta["config"]["target_dim"] == 48
    ids, mask = text_batch()
    ours = student(input_ids=ids, attention_mask=mask)
    theirs = AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(theirs.last_hidden_state[valid], ours.last_hidden_state[valid], atol=1e-5, rtol=0)
    again = load_student(tmp_path)(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(again.tokens, ours.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.pooled, ours.pooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["vit", "beit"])
def test_image_export_loads_with_timm(tmp_path, kind):
    from mmkd_core.teachers.base import ImagePreprocess

    student = create_student(kind, **VIT, token_pred="head").eval()
    with torch.no_grad():  # make the layer scales and biases non-trivial
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_student(student, tmp_path, preprocess=ImagePreprocess(size=IMG, mean=(0.5, 0.5, 0.5)))
    x = images()
    ours = student(pixel_values=x)
    timm_model = load_exported_vit(tmp_path)
    torch.testing.assert_close(timm_model.forward_features(x), ours.last_hidden_state, atol=1e-5, rtol=0)
    assert tuple(timm.data.resolve_data_config(model=timm_model)["mean"]) == (0.5, 0.5, 0.5)
    cfg = json.loads((tmp_path / "config.json").read_text())
    plain = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    from safetensors.torch import load_file

    plain.load_state_dict(load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(plain.forward_features(x), ours.last_hidden_state, atol=1e-5, rtol=0)
    # the classifier head is the pooled projection: timm's forward is the student's embedding
    torch.testing.assert_close(plain(x), ours.pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(timm_model(x), ours.pooled, atol=1e-5, rtol=0)
    again = load_student(tmp_path)(pixel_values=x)
    torch.testing.assert_close(again.tokens, ours.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.pooled, ours.pooled, atol=1e-5, rtol=0)


def test_multimodal_save_and_load(tmp_path):
    mm = create_student("multimodal", **MM, mome=True, vl_depth=1, pooled_dim=24).eval()
    save_student(mm, tmp_path)
    again = load_student(tmp_path)
    ids, mask = text_batch()
    torch.testing.assert_close(again.encode_text(ids, mask), mm.encode_text(ids, mask), atol=0, rtol=0)
    x = images()
    torch.testing.assert_close(again.encode_image(x), mm.encode_image(x), atol=0, rtol=0)
    with pytest.raises(MmkdError, match="not a saved student"):
        load_student(tmp_path / "nothing")


@pytest.mark.parametrize("init_values", [None, 0.1])
def test_multimodal_pre_norm_blocks_are_timms_and_load_the_same_keys(init_values):
    """The image tower and shared blocks are timm's ViT Block: same keys (students saved before still load)
    and the same function as the project's pre-norm block, padding mask included."""
    from mmkd_core.students.layers import Block
    from mmkd_core.students.multimodal import key_padding_mask, vit_block

    torch.manual_seed(0)
    ours = Block(32, 4, 96, eps=1e-6, init_values=init_values).eval()
    if init_values is not None:
        ours.ls1.gamma.data.normal_()
    theirs = vit_block(32, 4, 96, eps=1e-6, init_values=init_values).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 7, 32)
    mask = key_padding_mask(torch.arange(7)[None] < torch.tensor([[7], [4], [2]]))
    torch.testing.assert_close(theirs(x, attn_mask=mask), ours(x, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "rule, depth, want",
    [
        ("first", 3, [0, 1, 2]),
        ("last", 3, [3, 4, 5]),
        ("ends", 3, [0, 4, 5]),
        ("ends", 1, [0]),
        ("ends", 6, [0, 1, 2, 3, 4, 5]),
        ("spread", 3, [1, 3, 5]),
        ("spread", 2, [2, 5]),
        ("spread", 4, [0, 2, 3, 5]),
        ("spread", 1, [5]),
        ([5, 0, 2], 3, [5, 0, 2]),
        (None, 2, [0, 1]),
    ],
)
def test_init_block_rules_pick_the_blocks_they_name(rule, depth, want):
    from mmkd_core.students.base import resolve_blocks

    assert resolve_blocks("text", rule, depth, 6) == want


@pytest.mark.parametrize(
    "rule, depth, message",
    [
        ("top", 3, "init_blocks='top': give block indices or one of first, last, ends, spread"),
        ("ends", 7, "depth 7 is deeper than the 6-block init model"),
        ([0, 6], 2, "init blocks [6] do not exist in a 6-block init model"),
        ([0, 1], 3, "init_blocks lists 2 blocks for a depth-3 student"),
    ],
)
def test_init_block_rules_refuse_what_cannot_be_copied(rule, depth, message):
    from mmkd_core.students.base import resolve_blocks

    with pytest.raises(MmkdError, match=re.escape(message)):
        resolve_blocks("text", rule, depth, 6)
