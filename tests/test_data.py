import io
import pickle

import pytest

from diffusers_ptq.harness.data import _NumpyOnlyUnpickler, load_mnist, to_model_range


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo should-never-run",))


def test_restricted_unpickler_refuses_arbitrary_globals():
    payload = pickle.dumps(_Evil(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnlyUnpickler(io.BytesIO(payload)).load()


def test_mnist_splits_and_range():
    x, y = load_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert float(x.min()) == 0.0 and float(x.max()) <= 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    padded = to_model_range(x[:4])
    assert padded.shape == (4, 1, 32, 32)
    assert float(padded.min()) == -1.0 and float(padded[..., :2, :].max()) == -1.0  # padding is black
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
