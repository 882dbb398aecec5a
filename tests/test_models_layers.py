"""models.layers: Dice against a hand computation, MLP structure and leading-dimension handling."""

import pytest
import torch
from torch import nn

from models import MLP, Dice
from models.layers import activation_layer


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_dice(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-9):
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps))
    return p * x + (1 - p) * alpha * x


def test_dice_training_uses_batch_statistics_and_updates_moving_averages():
    torch.manual_seed(0)
    dice = Dice(5)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.5, -1.0, 2.0, 1.0]))
    x = torch.randn(64, 5) * 3 + 1
    out = dice(x)
    expected = hand_dice(x, x.mean(0), x.var(0, unbiased=False), dice.alpha.detach())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dice.norm.running_mean, 0.01 * x.mean(0))
    torch.testing.assert_close(dice.norm.running_var, 0.99 + 0.01 * x.var(0, unbiased=True))
    alpha_one = hand_dice(x, x.mean(0), x.var(0, unbiased=False), torch.ones(5))
    torch.testing.assert_close(out[:, 4], alpha_one[:, 4])  # alpha 1: identity
    torch.testing.assert_close(alpha_one, x)


def test_dice_eval_uses_moving_averages_and_alpha_learns():
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.norm.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        dice.norm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        dice.alpha.copy_(torch.tensor([0.1, 0.2, 0.3]))
    dice.eval()
    x = torch.randn(10, 3)
    expected = hand_dice(x, dice.norm.running_mean, dice.norm.running_var, dice.alpha.detach())
    torch.testing.assert_close(dice(x), expected)
    torch.testing.assert_close(dice(x[:1]), expected[:1])  # one sample: no batch statistics
    dice(x).sum().backward()
    p = torch.sigmoid((x - dice.norm.running_mean) / torch.sqrt(dice.norm.running_var + 1e-9))
    torch.testing.assert_close(dice.alpha.grad, ((1 - p) * x).sum(0))


def test_dice_three_dimensional_input_normalizes_over_all_positions():
    torch.manual_seed(0)
    dice = Dice(4)
    x = torch.randn(6, 7, 4)
    out = dice(x)
    assert out.shape == (6, 7, 4)
    flat = x.reshape(-1, 4)
    expected = hand_dice(flat, flat.mean(0), flat.var(0, unbiased=False), torch.zeros(4))
    torch.testing.assert_close(out.reshape(-1, 4), expected)


def test_mlp_layers_in_order_and_output_without_activation():
    mlp = MLP(6, hidden=(8, 4), activation="prelu", dropout=0.5, batch_norm=True, output_dim=1)
    kinds = [type(m) for m in mlp.layers]
    assert kinds == [
        nn.Linear, nn.BatchNorm1d, nn.PReLU, nn.Dropout,
        nn.Linear, nn.BatchNorm1d, nn.PReLU, nn.Dropout,
        nn.Linear,
    ]
    assert [m.out_features for m in mlp.layers if isinstance(m, nn.Linear)] == [8, 4, 1]
    bare = MLP(6, hidden=(3,), activation="relu")
    assert [type(m) for m in bare.layers] == [nn.Linear, nn.ReLU] and bare.output_dim == 3
    torch.manual_seed(0)
    assert bool((bare(torch.randn(20, 6)) >= 0).all())


def test_mlp_applies_to_every_position_of_a_sequence():
    torch.manual_seed(0)
    mlp = MLP(5, hidden=(7,), activation="dice", batch_norm=True, output_dim=2)
    x = torch.randn(3, 4, 5)
    out = mlp(x)
    assert out.shape == (3, 4, 2)
    mlp.eval()
    per_row = torch.stack([mlp(x[b, t].unsqueeze(0))[0] for b in range(3) for t in range(4)])
    torch.testing.assert_close(mlp(x).reshape(-1, 2), per_row)


def test_mlp_dropout_only_in_training():
    torch.manual_seed(0)
    mlp = MLP(4, hidden=(64,), dropout=0.5, output_dim=1)
    x = torch.randn(8, 4)
    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp(x))
    mlp.train()
    dropped = mlp.layers[:3](x)  # Linear, ReLU, Dropout
    kept_before = mlp.layers[:2](x)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * kept_before[kept])  # survivors scaled by 1 / (1 - p)
    assert 0 < int(kept.sum()) < int((kept_before != 0).sum())


def test_unknown_activation_is_a_clear_error():
    message = r"unknown activation 'gelu'; expected one of \('dice', 'prelu', 'relu', 'sigmoid'\)"
    with pytest.raises(ValueError, match=message):
        activation_layer("gelu", 4)
