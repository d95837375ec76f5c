"""The torch-free .pth reader / writer (dknet_jax.released.pth)."""

import collections
import importlib.util
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from dknet_jax.released.pth import (
    CheckpointError,
    StridedTensor,
    extract_state_dict,
    load_pth,
    read_state_dict,
    save_pth,
)


def _sample(rng):
    return collections.OrderedDict(
        [
            ("input_conv.0.weight", rng.normal(size=(4, 3, 3, 3, 6)).astype(np.float32)),
            ("bn.running_var", rng.uniform(0.5, 2, size=(4,)).astype(np.float64)),
            ("bn.num_batches_tracked", np.array(12345678901, np.int64)),
            ("half", rng.normal(size=(2, 3)).astype(np.float16)),
            ("ints", np.arange(-3, 3, dtype=np.int32).reshape(2, 3)),
            ("bytes", np.array([0, 7, 255], np.uint8)),
            ("mask", np.array([True, False, True])),
            ("empty", np.zeros((0, 5), np.float32)),
        ]
    )


def test_round_trip_nested(tmp_path):
    rng = np.random.default_rng(0)
    sd = _sample(rng)
    ckpt = {
        "model": sd,
        "optimizer": {
            "state": {0: {"step": np.array(3.0, np.float32), "exp_avg": np.ones(4, np.float32)}},
            "param_groups": [
                {
                    "lr": 1e-3,
                    "betas": (0.9, 0.999),
                    "amsgrad": False,
                    "foreach": None,
                    "params": [0, 1, 2],
                    "big": 2**40,
                    "neg": -7,
                }
            ],
        },
        "epoch": 384,
        "name": "dknet ü",
    }
    path = tmp_path / "c.pth"
    save_pth(ckpt, path)
    out = load_pth(path)
    assert out["epoch"] == 384 and out["name"] == "dknet ü"
    pg = out["optimizer"]["param_groups"][0]
    assert pg["betas"] == (0.9, 0.999) and pg["amsgrad"] is False and pg["foreach"] is None
    assert pg["params"] == [0, 1, 2] and pg["big"] == 2**40 and pg["neg"] == -7
    assert out["optimizer"]["state"][0]["step"].dtype == np.float32
    assert isinstance(out["model"], collections.OrderedDict)
    assert list(out["model"]) == list(sd)
    for k, v in sd.items():
        got = out["model"][k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        np.testing.assert_array_equal(got, v)
    sd2, info = read_state_dict(path)
    assert info["source"] == "model" and info["other_keys"] == ["optimizer", "epoch", "name"]
    assert list(sd2) == list(sd)


def test_views_strides_offsets_shared_storage(tmp_path):
    base = np.arange(60, dtype=np.float32)
    ref = base.copy()
    tensors = {
        # a transposed view: shape (4, 3) over a (3, 4) row-major block at offset 5
        "t": StridedTensor(base, 5, (4, 3), (1, 4)),
        # every other element from offset 1
        "s": StridedTensor(base, 1, (10,), (2,)),
        # broadcast (stride 0) and a scalar at the last element
        "b": StridedTensor(base, 7, (2, 3), (0, 1)),
        "scalar": StridedTensor(base, 59, (), ()),
        "whole": StridedTensor(base, 0, (60,), (1,)),
    }
    path = tmp_path / "v.pth"
    save_pth(tensors, path)
    with zipfile.ZipFile(path) as zf:  # one shared storage record
        assert [n for n in zf.namelist() if "/data/" in n] == ["archive/data/0"]
    out = load_pth(path)
    np.testing.assert_array_equal(out["t"], ref[5:17].reshape(3, 4).T)
    np.testing.assert_array_equal(out["s"], ref[1:21:2])
    np.testing.assert_array_equal(out["b"], np.stack([ref[7:10], ref[7:10]]))
    assert out["scalar"].shape == () and out["scalar"] == 59
    assert out["t"].flags.c_contiguous
    out["whole"][0] = -1  # arrays are independent copies
    assert out["t"][0, 0] == 5


def test_view_outside_storage_is_an_error(tmp_path):
    path = tmp_path / "bad.pth"
    save_pth({"x": StridedTensor(np.arange(10, dtype=np.float32), 5, (3,), (2,))}, path)
    np.testing.assert_array_equal(load_pth(path)["x"], [5, 7, 9])  # last element: fine
    save_pth({"x": StridedTensor(np.arange(10, dtype=np.float32), 5, (4,), (2,))}, path)
    with pytest.raises(CheckpointError, match="reaches element 11 .* only 10 elements"):
        load_pth(path)


def _zip_with_pickle(path, payload: bytes, extra=None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
        for k, v in (extra or {}).items():
            zf.writestr(k, v)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_code_execution(tmp_path, monkeypatch):
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, pickle.dumps({"model": _Evil()}, protocol=2))
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    with pytest.raises(
        CheckpointError, match=r"refusing to load the global '(posix|os|nt)\.system'"
    ):
        load_pth(path)
    assert called == []
    # builtins.eval via a REDUCE, and a torch.nn class: refused by name
    payload = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    _zip_with_pickle(path, payload)
    with pytest.raises(CheckpointError, match="'builtins.eval'"):
        load_pth(path)
    _zip_with_pickle(path, b"\x80\x02ctorch.nn.modules.linear\nLinear\n)R.")
    with pytest.raises(CheckpointError, match="'torch.nn.modules.linear.Linear'"):
        load_pth(path)


def test_legacy_and_non_zip_formats(tmp_path):
    legacy = tmp_path / "legacy.pth"
    # what torch < 1.6 writes first: pickle.dump(MAGIC_NUMBER, f, protocol=2)
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80\x02K\x03.")
    with pytest.raises(CheckpointError, match="legacy .*non-zip.*re-save"):
        load_pth(legacy)
    other = tmp_path / "x.pth"
    other.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        load_pth(other)


def test_truncated_archives(tmp_path):
    good = tmp_path / "good.pth"
    save_pth({"w": np.arange(1000, dtype=np.float32)}, good)
    raw = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_pth(cut)
    # a storage record shorter than numel * itemsize
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(short, "w") as zout:
        for n in zin.namelist():
            data = zin.read(n)
            zout.writestr(n, data[:100] if n == "archive/data/0" else data)
    with pytest.raises(CheckpointError, match="should hold 1000 elements .* has 100 bytes"):
        load_pth(short)
    # a truncated pickle
    _zip_with_pickle(cut, pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-5])
    with pytest.raises(CheckpointError, match="invalid or truncated"):
        load_pth(cut)
    # a missing storage record
    _zip_with_pickle(cut, _pickle_of_tensor_record("7"))
    with pytest.raises(CheckpointError, match="'archive/data/7' is missing"):
        load_pth(cut)


def _pickle_of_tensor_record(key: str) -> bytes:
    """data.pkl of {'x': tensor} whose storage key is ``key`` (no storage record written)."""
    from dknet_jax.released import pth

    w = pth._PickleWriter()
    w.emit({"x": np.zeros(3, np.float32)})
    w.out += b"."
    return bytes(w.out).replace(b"X\x01\x00\x00\x000", b"X\x01\x00\x00\x00" + key.encode())


def test_big_endian_byteorder_record(tmp_path):
    path = tmp_path / "be.pth"
    save_pth({"x": np.arange(4, dtype=np.float32)}, path)
    with zipfile.ZipFile(path) as zin:
        recs = {n: zin.read(n) for n in zin.namelist()}
    recs["archive/byteorder"] = b"big"
    recs["archive/data/0"] = np.arange(4, dtype=">f4").tobytes()
    with zipfile.ZipFile(path, "w") as zout:
        for n, d in recs.items():
            zout.writestr(n, d)
    np.testing.assert_array_equal(load_pth(path)["x"], np.arange(4, dtype=np.float32))


def test_extract_state_dict_layouts():
    a = np.zeros(2, np.float32)
    sd, info = extract_state_dict({"module.x.weight": a, "module.y.bias": a})
    assert list(sd) == ["x.weight", "y.bias"] and info["stripped_prefix"] == "module."
    for key in ("state_dict", "net", "model"):
        sd, info = extract_state_dict({key: {"x": a}, "epoch": 3})
        assert list(sd) == ["x"] and info["source"] == key and info["other_keys"] == ["epoch"]
    # mixed prefixes are left alone
    sd, _ = extract_state_dict({"module.x": a, "y": a})
    assert list(sd) == ["module.x", "y"]
    with pytest.raises(CheckpointError, match="no model state dict.*'epoch': 'int'"):
        extract_state_dict({"epoch": 3, "weights": [a]})
    with pytest.raises(CheckpointError, match="holds a list"):
        extract_state_dict([a])


def test_writer_rejects_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="cannot write a object"):
        save_pth({"x": object()}, tmp_path / "o.pth")
    with pytest.raises(TypeError, match="no torch storage type"):
        save_pth({"x": np.zeros(2, np.complex64)}, tmp_path / "o.pth")
    assert not (tmp_path / "o.pth").exists()


def test_stdlib_pickle_framing_is_read(tmp_path):
    """Memo opcodes (BINPUT / BINGET) and protocol 2 framing as pickle itself writes them."""
    obj = {"a": [1, 2.5, "s"], "b": (None, True)}
    obj["c"] = obj["a"]  # memo reference
    path = tmp_path / "p.pth"
    _zip_with_pickle(path, pickle.dumps(obj, protocol=2))
    out = load_pth(path)
    assert out["a"] == [1, 2.5, "s"] and out["c"] is out["a"] and out["b"] == (None, True)
    assert struct.calcsize("<i") == 4


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_cross_check_with_torch(tmp_path):  # pragma: no cover - torch is optional
    import torch

    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.normal(size=(5, 6)).astype(np.float32))
    ckpt = {
        "model": collections.OrderedDict(w=t, v=t.t()[1:, ::2], n=torch.tensor(7)),
        "optimizer": {"param_groups": [{"lr": 0.1}]},
    }
    p = tmp_path / "torch.pth"
    torch.save(ckpt, p)
    out = load_pth(p)
    for k, v in ckpt["model"].items():
        np.testing.assert_array_equal(out["model"][k], v.numpy())
    q = tmp_path / "ours.pth"
    save_pth({k: v.numpy() for k, v in ckpt["model"].items()}, q)
    back = torch.load(q, map_location="cpu", weights_only=True)
    for k, v in ckpt["model"].items():
        np.testing.assert_array_equal(back[k].numpy(), v.numpy())
