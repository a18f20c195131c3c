"""GuidedMix-Net and S4MIM pieces on tiny tensors with known answers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segsweep.methods.guidedmix import (
    MITrans,
    generate_pseudo_mask,
    mix_images,
    mixed_target,
    pair_by_similarity,
    pool_embedding,
    reference_probs,
)
from segsweep.methods.s4mim import classwise_regions, masked_mean, patch_mask, pick_classes
from segsweep.primitives import IGNORE, one_hot_ignore

# -- GuidedMix-Net -------------------------------------------------------------------------


def test_pairing_picks_the_most_similar_labeled_image() -> None:
    emb_l = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=1)
    emb_u = F.normalize(
        torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.1, 0.0], [0.0, 1.0, 0.1], [0.2, 0.1, 0.8]]), dim=1
    )
    index, sim = pair_by_similarity(emb_u, emb_l)
    assert index.tolist() == [2, 0, 1, 2]
    assert torch.allclose(sim, (emb_u * emb_l[index]).sum(1))


def test_pool_embedding_is_unit_length_channel_means() -> None:
    feat = torch.zeros(2, 2, 4, 4)
    feat[0, 0] = 3.0
    feat[1, 1] = 1.0
    emb = pool_embedding(feat)
    assert emb.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_mixing_is_a_per_pair_convex_combination() -> None:
    x_l, x_u = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    mixed = mix_images(x_l, x_u, torch.tensor([0.25, 0.5]))
    assert mixed[0].unique().tolist() == [0.25] and mixed[1].unique().tolist() == [0.5]


def test_mask_generation_recovers_a_known_unlabeled_mask_from_a_constructed_mix() -> None:
    c = 4
    g = torch.Generator().manual_seed(0)
    y_l = torch.randint(0, c, (3, 8, 8), generator=g)
    y_u = torch.randint(0, c, (3, 8, 8), generator=g)
    y_l[:, 0] = IGNORE  # ignored rows of the labeled mask fall back to its prediction
    p_l = torch.softmax(torch.randn(3, c, 8, 8, generator=g), 1)
    # a soft unlabeled prediction: 0.4 on the true class, 0.2 on each other class
    p_u = one_hot_ignore(y_u, c) * 0.2 + 0.2
    lam = torch.tensor([0.1, 0.3, 0.45])
    ref = reference_probs(y_l, p_l, c)
    p_mix = mixed_target(ref, p_u, lam)  # the mix the mixed branch is trained to predict
    pseudo, conf = generate_pseudo_mask(p_mix, ref, lam)
    assert torch.equal(pseudo, y_u)
    assert torch.allclose(conf, torch.full_like(conf, 0.4))
    # the arg-max of the mix itself is wrong where the labeled partner's class dominates
    differs = (y_l != y_u) & (y_l != IGNORE)
    assert (p_mix.argmax(1)[2][differs[2]] == y_l[2][differs[2]]).all()


def test_mitrans_starts_as_the_identity_and_uses_the_guide() -> None:
    torch.manual_seed(0)
    module = MITrans(channels=8, steps=2, max_side=4)
    mixed, guide = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    assert torch.allclose(module(mixed, guide), mixed)  # zero-initialised output projections
    for step in module.steps:
        torch.nn.init.normal_(step.out.weight)
    a, b = module(mixed, guide), module(mixed, guide + 1)
    assert a.shape == mixed.shape and not torch.allclose(a, b)


# -- S4MIM -----------------------------------------------------------------------------------


def test_patch_mask_masks_whole_cells_at_the_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    m = patch_mask(3, 16, 16, 4, 0.5, g, torch.device("cpu"))
    assert m.shape == (3, 16, 16)
    cells = m.view(3, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(3, 16, 16)
    assert ((cells.float().mean(-1) == 0) | (cells.float().mean(-1) == 1)).all()  # never a partial cell
    assert (m.float().mean((1, 2)) == 0.5).all()


def test_classwise_masking_never_mixes_two_classes_in_a_target() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (4, 16, 16), generator=g)
    labels[:, :2] = IGNORE
    masked = patch_mask(4, 16, 16, 4, 0.5, g, torch.device("cpu"))
    classes = pick_classes(labels, g)
    target, context = classwise_regions(labels, masked, classes, class_wise=True)
    for i in range(4):
        assert labels[i][target[i]].unique().tolist() == [classes[i].item()]
        assert labels[i][context[i]].unique().tolist() == [classes[i].item()]
        assert not (target[i] & context[i]).any()
        assert not target[i][~masked[i]].any() and not context[i][masked[i]].any()
    plain_target, plain_context = classwise_regions(labels, masked, classes, class_wise=False)
    assert torch.equal(plain_target, masked) and torch.equal(plain_context, ~masked)


def test_pick_classes_only_picks_present_classes() -> None:
    labels = torch.full((2, 4, 4), IGNORE)
    labels[0, 0, 0] = 2
    picked = pick_classes(labels, torch.Generator().manual_seed(0))
    assert picked.tolist() == [2, -1]


def test_masked_mean_averages_features_over_a_region() -> None:
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, :2, :2] = True
    assert masked_mean(feats, region).item() == (0 + 1 + 4 + 5) / 4


def test_semantic_mim_predicts_masked_cells_from_context_and_trains_the_mask_token(tiny) -> None:
    from segsweep.training.loop import build_method

    for arch in ("unet", "deeplabv3plus"):
        method = build_method(tiny(method="s4mim", **{"model.arch": arch}), 4)
        x = torch.randn(2, 3, 64, 64)
        feats = method.model.forward_features(x)
        cells = torch.ones(2, *feats.encoder[-1].shape[-2:], dtype=torch.bool)  # every deep cell masked
        logits = method.semantic_mim_logits(feats.encoder, cells, x.shape[-2:])
        # Not one constant (the head's bias, as masking the decoder's output gave): the
        # decoder reads the context it has left, so the prediction varies across the image.
        assert logits.std(dim=(2, 3)).min() > 1e-4, arch
        # the token is learned (with some cells masked: batch norm erases a constant map)
        cells[:, ::2] = False
        method.semantic_mim_logits(feats.encoder, cells, x.shape[-2:]).logsumexp(1).mean().backward()
        assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0, arch
