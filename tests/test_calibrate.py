"""Theta calibration: the smallest theta per layer that keeps a recall target, written as a policy."""

import pytest
import torch

from sparse_prefill.cli import main
from sparse_prefill.evaluation.calibrate import LayerTheta, calibrated_policy, smallest_theta
from sparse_prefill.evaluation.recall import attention_recall
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.policy import load_policy

PARAMS = dict(block=64, group_blocks=1, sink=64, local=64, share_kv_heads=True, dense_tail=0, dense_above=0.4)


def _recall(q, k, theta):
    scale = q.shape[-1] ** -0.5
    plan = anchor_identify_reference(q, k, scale=scale, **{**PARAMS, "theta": theta, "dense_above": 1.0})
    return attention_recall(q, k, plan, scale)


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_smallest_theta_reaches_the_target_and_a_smaller_one_does_not(target):
    q, k, _ = structured_qkv(640, 4, 2, 64, device="cpu", dtype=torch.float32, seed=3)
    tolerance = 0.125
    theta, recall, density, reached = smallest_theta(q, k, PARAMS, target, tolerance=tolerance)
    assert reached and recall >= target and 0 < density <= 1
    assert recall == pytest.approx(_recall(q, k, theta))
    assert theta == 0 or _recall(q, k, theta - tolerance) < target


def test_an_unreachable_target_is_reported_not_hidden():
    q, k, _ = structured_qkv(640, 4, 2, 64, device="cpu", dtype=torch.float32, seed=3)
    theta, recall, _, reached = smallest_theta(q, k, PARAMS, 1.0, high=0.5)
    assert not reached and theta == 0.5 and recall < 1.0


def test_calibrated_policy_keeps_the_base_parameters_and_sets_theta_per_layer(tmp_path):
    base = load_policy({"min_length": 4096, "default": {"pattern": "anchor", "local": 256, "share_kv_heads": False}})
    layers = [LayerTheta(0, 5.25, 0.951, 0.3, True), LayerTheta(3, 9.0, 0.93, 0.6, False)]
    path = tmp_path / "calibrated.yaml"
    path.write_text(calibrated_policy(base, layers, "test header"))
    policy = load_policy(path)
    assert policy.min_length == 4096
    for layer, theta in ((0, 5.25), (3, 9.0), (7, 9.0)):  # layer 7 was not measured: the largest theta
        choice = policy.choice_for(layer, 0).as_dict()
        assert choice["theta"] == theta
        assert {name: choice[name] for name in ("local", "share_kv_heads")} == {"local": 256, "share_kv_heads": False}


def test_calibration_starts_from_an_anchor_policy():
    with pytest.raises(ValueError, match="anchor"):
        calibrated_policy(load_policy("streaming.yaml"), [LayerTheta(0, 1.0, 1.0, 1.0, True)], "")


@pytest.mark.slow
def test_cli_writes_a_loadable_policy_from_the_packaged_model(tmp_path, capsys):
    out = tmp_path / "smollm2.yaml"
    assert main(["calibrate", "--tokens", "512", "--layers", "0", "1", "--target-recall", "0.9", "--out", str(out)]) == 0
    policy = load_policy(out)
    assert [o.layers.ranges for o in policy.overrides] == [(range(0, 1),), (range(1, 2),)]
    assert "layer 0: theta" in capsys.readouterr().out


def test_cli_refuses_an_impossible_target(tmp_path):
    with pytest.raises(SystemExit):
        main(["calibrate", "--target-recall", "1.5", "--out", str(tmp_path / "x.yaml")])

