"""Losses: the pure GAN/L1 functions, the adaptive weight, the PatchGAN discriminator, the loss modules."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcae.losses import (
    GANConfig,
    GANLoss,
    PatchGANDiscriminator,
    ReconstructionLoss,
    adaptive_gan_weight,
    adopt_weight,
    hinge_d_loss,
    hinge_g_loss,
    l1,
    non_saturating_d_loss,
    non_saturating_g_loss,
)


def test_l1_is_mean_absolute_error():
    x, y = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert l1(x, y).item() == pytest.approx((1 + 0 + 2 + 2) / 4)


def test_hinge_losses():
    big = torch.full((2, 1, 3, 3), 2.0)
    assert hinge_d_loss(big, -big).item() == 0.0  # both beyond the margin
    zeros = torch.zeros(2, 1, 3, 3)
    assert hinge_d_loss(zeros, zeros).item() == pytest.approx(1.0)
    assert hinge_d_loss(-big, big).item() == pytest.approx(3.0)  # 0.5 * (3 + 3)
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)


def test_non_saturating_losses_match_bce():
    real, fake = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    expected_d = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                        + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    torch.testing.assert_close(non_saturating_d_loss(real, fake), expected_d)
    torch.testing.assert_close(non_saturating_g_loss(fake), F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)))


def test_adopt_weight_is_a_warmup_switch():
    assert adopt_weight(0.8, step=0, threshold=10) == 0.0
    assert adopt_weight(0.8, step=9, threshold=10) == 0.0
    assert adopt_weight(0.8, step=10, threshold=10) == 0.8
    assert adopt_weight(0.8, step=3, threshold=10, value=0.1) == 0.1


def test_adaptive_weight_is_gradient_norm_ratio():
    layer = nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    out = x @ layer.T
    rec = out.square().mean()
    g = 3.0 * rec  # a GAN loss whose gradient is 3x the reconstruction gradient -> weight 1/3
    weight = adaptive_gan_weight(rec, g, layer)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(1 / 3, rel=1e-3)
    rec_grad = torch.autograd.grad(rec, layer, retain_graph=True)[0]
    assert weight.item() == pytest.approx(rec_grad.norm().item() / (3 * rec_grad.norm().item() + 1e-4), rel=1e-6)
    # clamped at max_weight when the GAN gradient vanishes
    assert adaptive_gan_weight(rec, 0.0 * out.sum(), layer, max_weight=50.0).item() == 50.0


@pytest.mark.parametrize("size,expected", [(64, 6), (256, 30)])
def test_patchgan_output_is_a_logit_map(size, expected):
    disc = PatchGANDiscriminator(ndf=64, n_layers=3)
    logits = disc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, expected, expected)  # the pix2pix 70x70 PatchGAN gives 30x30 on 256x256
    n_params = sum(p.numel() for p in disc.parameters())
    assert 2.7e6 < n_params < 2.8e6  # pix2pix's NLayerDiscriminator(ndf=64, n_layers=3): 2.77M


def test_patchgan_groupnorm_is_batch_independent_and_batchnorm_is_not():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    group = PatchGANDiscriminator(norm="group")
    torch.testing.assert_close(group(x)[:1], group(x[:1]), atol=1e-5, rtol=1e-5)
    batch = PatchGANDiscriminator(norm="batch").train()
    assert not torch.allclose(batch(x)[:1], batch(x[:1]), atol=1e-3)
    with pytest.raises(ValueError):
        PatchGANDiscriminator(norm="layer")


def test_reconstruction_loss_weights_and_gradients():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).requires_grad_(True)
    only_l1 = ReconstructionLoss(l1_weight=2.0, lpips_weight=0.0)
    loss, logs = only_l1(x, y)
    assert only_l1.perceptual is None and "lpips" not in logs and "mse" not in logs
    torch.testing.assert_close(loss, 2.0 * (y - x).abs().mean())
    with_mse = ReconstructionLoss(l1_weight=0.5, lpips_weight=0.0, mse_weight=3.0)
    loss, logs = with_mse(x, y)
    torch.testing.assert_close(logs["mse"], (y - x).square().mean().detach())
    torch.testing.assert_close(loss, 0.5 * (y - x).abs().mean() + 3.0 * (y - x).square().mean())
    loss.backward()
    torch.testing.assert_close(y.grad, 0.5 * (y - x).sign() / x.numel() + 3.0 * 2 * (y - x).detach() / x.numel())
    y.grad = None
    from dcae.perceptual import LPIPS

    lpips = LPIPS("alex")
    both = ReconstructionLoss(l1_weight=1.0, lpips_weight=0.5, perceptual=lpips)
    loss, logs = both(x, y)
    expected = (y - x).abs().mean() + 0.5 * lpips(y, x).mean()
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"l1", "lpips", "rec_loss"}
    loss.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())  # LPIPS stays frozen


def test_gan_loss_warmup_and_discriminator_learns():
    torch.manual_seed(0)
    gan = GANLoss(GANConfig(weight=0.5, adaptive=False, disc_warmup_steps=5, ndf=32, n_layers=2, norm="group"))
    fake = torch.zeros(4, 3, 16, 16, requires_grad=True)
    g, logs = gan.generator_loss(fake, torch.tensor(1.0), step=4)
    assert g.item() == 0.0 and logs["g_loss"].item() == 0.0  # discriminator warm-up: no GAN term yet
    g, logs = gan.generator_loss(fake, torch.tensor(1.0), step=5)
    assert g.item() == pytest.approx(0.5 * logs["g_loss"].item())
    g.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    # The discriminator separates noise (real) from flat images (fake) within a few steps.
    opt = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.9))
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    first = None
    for _ in range(15):
        d_loss, d_logs = gan.discriminator_loss(real, fake)
        first = first if first is not None else d_loss.item()
        opt.zero_grad()
        d_loss.backward()
        opt.step()
    assert d_loss.item() < 0.5 * first
    assert d_logs["logits_real"] > d_logs["logits_fake"]


def test_gan_loss_adaptive_weight_uses_last_layer():
    torch.manual_seed(0)
    gan = GANLoss(GANConfig(weight=1.0, adaptive=True, ndf=32))
    head = nn.Conv2d(8, 3, 3, padding=1)
    feats = torch.randn(2, 8, 32, 32)
    y = head(feats)
    rec = (y - torch.zeros_like(y)).abs().mean()
    g_term, logs = gan.generator_loss(y, rec, step=0, last_layer=head.weight)
    expected_weight = adaptive_gan_weight(rec, logs["g_loss"].new_tensor(0) + gan.g_loss_fn(gan.discriminator(y)),
                                          head.weight)
    torch.testing.assert_close(logs["gan_weight"], expected_weight)
    torch.testing.assert_close(g_term, expected_weight * logs["g_loss"])
    with pytest.raises(ValueError):
        GANLoss(GANConfig(loss="wasserstein"))
