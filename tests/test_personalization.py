"""simulations/personalization.py: each device's fit of the scorer's weights to its own examples. Infinite lam
keeps the global weights, a large lam stays near them, a small one lowers the device's own loss, devices do not
affect one another, and the local choice keeps the global weights when they predict the held-out items best."""

from __future__ import annotations

import math

import torch

from simulations import personalization as ps


def _device_data(devices=3, per_device=6, items=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(devices * per_device, 9, items + 1, generator=g)
    owner = torch.arange(devices).repeat_interleave(per_device)
    # each device's next items follow its own weight vector: personal weights can fit them
    truth = torch.randn(devices, 9, generator=g) * 2
    scores = torch.einsum("bk,bki->bi", truth[owner], features)
    nexts = scores[:, 1:].argmax(1) + 1
    mask = torch.zeros(devices * per_device, items + 1)
    return features, mask, nexts, owner


def _loss(w, features, mask, nexts, owner):
    return float(ps.example_losses(w, features, mask, nexts, owner).mean())


def test_infinite_lam_keeps_the_global_weights_and_a_small_lam_fits_the_device():
    features, mask, nexts, owner = _device_data()
    w0 = torch.zeros(9)
    kept = ps.personal_weights(w0, features, mask, nexts, owner, torch.full((3,), math.inf))
    assert torch.equal(kept, w0.repeat(3, 1))
    near = ps.personal_weights(w0, features, mask, nexts, owner, torch.full((3,), 1e4))
    loose = ps.personal_weights(w0, features, mask, nexts, owner, torch.full((3,), 0.01))
    assert (near - w0).norm() < 0.01 * (loose - w0).norm()
    assert _loss(loose, features, mask, nexts, owner) < 0.8 * _loss(kept, features, mask, nexts, owner)


def test_devices_are_fitted_independently():
    features, mask, nexts, owner = _device_data()
    w0 = torch.zeros(9)
    together = ps.personal_weights(w0, features, mask, nexts, owner, torch.tensor([0.1, math.inf, 0.1]))
    assert torch.equal(together[1], w0)
    alone = ps.personal_weights(w0, features[owner == 0], mask[owner == 0], nexts[owner == 0],
                                owner[owner == 0], torch.tensor([0.1]))
    assert torch.allclose(together[0], alone[0], atol=1e-3)


def test_the_local_choice_keeps_the_global_weights_when_they_predict_the_held_out_items():
    features, mask, nexts, owner = _device_data(devices=2, per_device=8)
    truth = torch.zeros(2, 9)
    truth[:, 0] = 5.0  # the held-out items follow channel 0, which the global weights already use
    held_features = torch.randn(8, 9, 13, generator=torch.Generator().manual_seed(3))
    held_owner = torch.arange(2).repeat_interleave(4)
    held_nexts = held_features[:, 0, 1:].argmax(1) + 1
    w_global = torch.zeros(9)
    w_global[0] = 5.0
    chosen = ps.local_choice(w_global, (features, mask, nexts, owner),
                             (held_features, torch.zeros(8, 13), held_nexts, held_owner), 2)
    assert chosen.tolist() == [math.inf, math.inf]
