import pytest
import torch
from torch.testing import assert_close

from ampo_train.advantages import group_advantages


def test_ampo_example_two_teachers_six_wrong():
    # G=8: two injected teacher traces (reward 1) + six wrong rollouts (0).
    # mean = 2/8 = 0.25 -> teacher 1 - 0.25 = +0.75, rollouts 0 - 0.25 = -0.25.
    r = torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0])
    adv = group_advantages(r, group_size=8)
    assert_close(adv, torch.tensor([0.75, 0.75, -0.25, -0.25, -0.25, -0.25, -0.25, -0.25]))


def test_flat_batch_of_groups_and_2d_input_agree():
    # Group 1: [1, 0, 0, 1] mean 0.5 -> [0.5, -0.5, -0.5, 0.5]
    # Group 2: [0, 0, 0, 0] all equal -> zeros
    # Group 3: [1, 1, 1, 1] all equal -> zeros
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0])
    assert_close(group_advantages(r, 4), expected)
    adv2d = group_advantages(r.reshape(3, 4))
    assert adv2d.shape == (3, 4)
    assert_close(adv2d, expected.reshape(3, 4))


def test_bool_and_int_rewards_are_accepted():
    # [True, False, False] mean 1/3 -> [2/3, -1/3, -1/3]
    adv = group_advantages(torch.tensor([[True, False, False]]))
    assert adv.dtype == torch.float32
    assert_close(adv, torch.tensor([[2 / 3, -1 / 3, -1 / 3]]))


def test_group_std_scaling_is_unbiased():
    # [1, 1, 0, 0]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
    # std = sqrt(1/3) = 0.577350...; A = +-0.5 / (0.577350 + eps).
    r = torch.tensor([1.0, 1, 0, 0])
    std = (1 / 3) ** 0.5
    adv = group_advantages(r, 4, scale="group", eps=1e-6)
    assert_close(adv, torch.tensor([0.5, 0.5, -0.5, -0.5]) / (std + 1e-6))
    # TRL's eps (1e-4): 0.5 / (0.5773503 + 0.0001) = 0.5 / 0.5774503 = 0.8658754
    adv_trl = group_advantages(r, 4, scale="group", eps=1e-4)
    assert adv_trl[0].item() == pytest.approx(0.5 / (std + 1e-4), rel=1e-6)
    assert adv_trl[0].item() == pytest.approx(0.8658754, rel=1e-6)


def test_group_scaling_all_equal_and_singleton_groups_are_zero():
    # all equal: numerator 0, std 0 -> 0 / eps = 0
    assert_close(group_advantages(torch.ones(4), 4, scale="group"), torch.zeros(4))
    # G=1: r - mean = 0; the undefined unbiased std must not turn it into NaN
    assert_close(group_advantages(torch.tensor([1.0, 0.0]), 1, scale="group"), torch.zeros(2))


def test_bad_arguments():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 4)  # 6 rewards do not split into groups of 4
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6))  # flat without group size
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 3), 4)  # contradicts shape
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 4, scale="batch")
