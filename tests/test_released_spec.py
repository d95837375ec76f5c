"""The released state-dict spec (dknet_jax.released.spec)."""

import numpy as np
import pytest

from dknet_jax.released import spec as S
from dknet_jax.released.pth import read_state_dict, save_pth


def test_spec_counts_and_hand_checked_entries():
    sp = S.spec_by_name()
    assert len(sp) == len(S.released_spec())  # unique names
    # 7 levels: 2 encoder blocks each, 6 decoders with 2 blocks, each block 2 BNs; plus
    # 6 down BNs + 6 up BNs + output_layer + heads (linear 2, offset 1, candidate 2) +
    # towers (4 x 3) + weight generator 1
    n_bn = sum(e.role == "bn_weight" for e in sp.values())
    assert n_bn == (7 * 2 + 6 * 2) * 2 + 6 + 6 + 1 + 5 + 12 + 1 == 83
    hand = {
        "input_conv.0.weight": (32, 3, 3, 3, 6),
        "unet.conv.2.weight": (64, 2, 2, 2, 32),
        "unet.deconv.2.weight": (32, 2, 2, 2, 64),
        "unet.deconv.0.running_var": (64,),
        "unet.blocks_tail.block0.i_branch.0.weight": (32, 1, 1, 1, 64),
        "unet.blocks_tail.block0.conv_branch.2.weight": (32, 3, 3, 3, 64),
        "unet.u.u.u.u.u.u.blocks.block1.conv_branch.5.weight": (224, 3, 3, 3, 224),
        "unet.u.u.u.u.u.deconv.2.weight": (192, 2, 2, 2, 224),
        "candidate_linear.0.weight": (32, 35),
        "linear.6.weight": (20, 32),
        "offset_linear.weight": (3, 32),
        "merge_branch.0.0.weight": (35, 35, 1),
        "merge_branch.3.weight": (1, 35, 1),
        "mask_branch.3.bias": (16,),
        "weight_generator.before_embedding_tower.0.0.weight": (16, 16, 1),
        "weight_generator.controller.weight": (337, 16, 1),
        "output_layer.0.num_batches_tracked": (),
    }
    for name, shape in hand.items():
        assert sp[name].shape == shape, name
    # identity i_branch (in == out) has no weight; no u.* below the 7th level
    assert "unet.blocks.block0.i_branch.0.weight" not in sp
    assert "unet.blocks_tail.block1.i_branch.0.weight" not in sp
    assert not any(n.startswith("unet.u.u.u.u.u.u.conv.") for n in sp)
    # the towers carry no bias on the conv_block convs; BN eps per module
    assert "mask_branch.0.0.bias" not in sp
    assert sp["mask_branch.0.1.weight"].eps == 1e-5
    assert sp["weight_generator.before_embedding_tower.0.1.weight"].eps == 1e-5
    assert sp["linear.1.weight"].eps == 1e-4 and sp["unet.conv.0.weight"].eps == 1e-4
    assert S.KERNEL_LEN == 337
    unused = [n for n in sp if S.is_unused(n)]
    assert {n.split(".")[0] for n in unused} == {"semantic_branch", "recall_linear"}


def test_random_state_dict_matches_spec_and_round_trips(tmp_path):
    sd = S.random_state_dict(3)
    assert S.check_against_spec(sd) == {"missing": [], "unexpected": [], "shape_mismatch": []}
    assert sd["unet.conv.0.num_batches_tracked"].dtype == np.int64
    assert sd["unet.conv.0.running_mean"].dtype == np.float32
    assert np.all(sd["linear.1.running_var"] >= 0.5)
    assert np.std(sd["linear.1.running_mean"]) > 0.05  # non-trivial statistics
    path = tmp_path / "released.pth"
    save_pth({"model": sd, "optimizer": {"param_groups": [{"lr": 1e-3}]}}, path)
    back, info = read_state_dict(path)
    assert info["source"] == "model" and list(back) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_check_against_spec_reports():
    sd = S.random_state_dict(0)
    del sd["offset_linear.bias"]
    sd["extra.weight"] = np.zeros(1, np.float32)
    sd["linear.6.weight"] = np.zeros((13, 32), np.float32)
    rep = S.check_against_spec(sd)
    assert rep["missing"] == ["offset_linear.bias"]
    assert rep["unexpected"] == ["extra.weight"]
    assert rep["shape_mismatch"] == [("linear.6.weight", (20, 32), (13, 32))]


def test_layout_detection_and_conversion():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 3, 3, 3, 6))  # KRSC
    rskc = np.transpose(w, (1, 2, 3, 0, 4))
    rsck = np.transpose(w, (1, 2, 3, 4, 0))
    assert S.detect_conv_layout({"input_conv.0.weight": w}) == "KRSC"
    assert S.detect_conv_layout({"input_conv.0.weight": rskc}) == "RSKC"
    assert S.detect_conv_layout({"input_conv.0.weight": rsck}) == "RSCK"
    np.testing.assert_array_equal(S.to_krsc(rskc, "RSKC"), w)
    np.testing.assert_array_equal(S.to_krsc(rsck, "RSCK"), w)
    with pytest.raises(ValueError, match="expected one of"):
        S.detect_conv_layout({"input_conv.0.weight": np.zeros((6, 3, 3, 3, 32))})


def test_subm1_matrix_is_a_memory_reinterpretation():
    cin, cout = 4, 2
    w = np.arange(cout * cin, dtype=np.float32).reshape(cout, 1, 1, 1, cin)  # KRSC
    m = S.subm1_matrix(w, cin, cout)
    # M[i, o] = flat[i * Cout + o]; flat = [0..7] in [Cout, Cin] order
    assert m.shape == (cin, cout)
    for i in range(cin):
        for o in range(cout):
            assert m[i, o] == i * cout + o
    assert not np.array_equal(m, w[:, 0, 0, 0, :].T)
