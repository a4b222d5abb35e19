"""Training data: .npz loading, batching, shuffling and the validation split."""

from __future__ import annotations

import numpy as np
import pytest

from onnxgrad.errors import OnnxgradError
from onnxgrad.train.data import DataError, as_inputs, batches, load_npz, num_batches, split


def test_load_npz_by_input_name(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((5, 2)), b=np.ones((5, 3)), target=np.arange(5))
    inputs, targets = load_npz(path, ["a", "b"])
    assert set(inputs) == {"a", "b"}
    assert inputs["b"].shape == (5, 3)
    np.testing.assert_array_equal(targets, np.arange(5))


@pytest.mark.parametrize("alias", ["x", "input", "data"])
def test_load_npz_single_input_alias(tmp_path, alias):
    path = tmp_path / "d.npz"
    np.savez(path, **{alias: np.zeros((4, 2))})
    inputs, targets = load_npz(path, ["pixels"])
    assert list(inputs) == ["pixels"] and inputs["pixels"].shape == (4, 2)
    assert targets is None


def test_load_npz_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz", ["x"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_npz(bad, ["x"])

    path = tmp_path / "d.npz"
    np.savez(path, a=np.zeros((5, 2)), labels=np.arange(5))
    with pytest.raises(
        DataError,
        match=r"no array for model input\(s\) b; it holds: a \[5, 2\], "
        r"labels \[5\]",
    ):
        load_npz(path, ["a", "b"])
    # Aliases are only for single-input models.
    np.savez(path, x=np.zeros((5, 2)), y=np.zeros((5, 2)))
    with pytest.raises(DataError, match="a, b"):
        load_npz(path, ["a", "b"])
    np.savez(path, x=np.zeros((5, 2)), target=np.zeros(4))
    with pytest.raises(DataError, match="disagree.*x: 5, target: 4"):
        load_npz(path, ["x"])


def test_data_error_is_an_onnxgrad_error():
    assert issubclass(DataError, OnnxgradError) and issubclass(DataError, ValueError)


def test_as_inputs():
    x = np.zeros((3, 2))
    assert as_inputs(x, ["x"])["x"] is x
    with pytest.raises(DataError, match="2 inputs"):
        as_inputs(x, ["a", "b"])
    with pytest.raises(DataError, match="missing model input.*b"):
        as_inputs({"a": x}, ["a", "b"])


def test_batches_cover_every_sample_once():
    inputs = {"x": np.arange(10)[:, None] * np.ones((1, 2)), "y": np.arange(10)}
    targets = np.arange(10) * 10
    seen = []
    sizes = []
    for batch, t in batches(inputs, targets, 4, shuffle=True, rng=np.random.default_rng(0)):
        np.testing.assert_array_equal(batch["x"][:, 0], batch["y"])  # rows stay aligned
        np.testing.assert_array_equal(t, batch["y"] * 10)
        seen.extend(batch["y"].tolist())
        sizes.append(len(t))
    assert sorted(seen) == list(range(10))
    assert seen != list(range(10))  # shuffled
    assert sizes == [4, 4, 2] and num_batches(10, 4) == 3


def test_scalar_inputs_go_whole_to_every_batch():
    rate = np.array(16000, np.int64)  # Silero VAD's sample rate: a 0-d input
    inputs = {"x": np.arange(5), "sr": rate}
    got = list(batches(inputs, np.arange(5), 2))
    assert [len(b["x"]) for b, _ in got] == [2, 2, 1]
    assert all(b["sr"] is rate for b, _ in got)
    (train, _), (val, _) = split(inputs, np.arange(5), 0.4)
    assert train["sr"] is rate and val["sr"] is rate and len(val["x"]) == 2
    with pytest.raises(DataError, match="every input is a scalar"):
        list(batches({"sr": rate}, None, 2))


def test_batches_in_order_and_reproducible():
    inputs = {"x": np.arange(7)}
    ordered = [b["x"].tolist() for b, _ in batches(inputs, None, 3)]
    assert ordered == [[0, 1, 2], [3, 4, 5], [6]]
    first = [b["x"].tolist() for b, _ in batches(inputs, None, 3, True, np.random.default_rng(5))]
    again = [b["x"].tolist() for b, _ in batches(inputs, None, 3, True, np.random.default_rng(5))]
    assert first == again
    with pytest.raises(DataError, match="batch_size"):
        next(batches(inputs, None, 0))


def test_split():
    inputs = {"x": np.arange(20)}
    targets = np.arange(20) + 100
    (tr, tt), (va, vt) = split(inputs, targets, 0.25, np.random.default_rng(0))
    assert len(tr["x"]) == 15 and len(va["x"]) == 5
    assert set(tr["x"]) | set(va["x"]) == set(range(20))
    assert not set(tr["x"]) & set(va["x"])
    np.testing.assert_array_equal(tt, tr["x"] + 100)
    np.testing.assert_array_equal(vt, va["x"] + 100)

    (tr, _), (va, _) = split(inputs, None, 0.1)
    assert va["x"].tolist() == [18, 19]  # without an rng the last samples are held out

    with pytest.raises(DataError, match=r"\[0, 1\)"):
        split(inputs, targets, 1.0)
    with pytest.raises(DataError, match="non-empty"):
        split({"x": np.arange(3)}, None, 0.1)
