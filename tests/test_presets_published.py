"""Published one-step results of each framework, reproduced through its preset."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_rmsprop import RMSprop


def one_step_on_half_square(optimizer, x0=10.0):
    # loss = x**2 / 2, so the gradient is x itself.
    x = mx.array(x0)
    return optimizer.apply_gradients({"x": x}, {"x": x})["x"].item()


@pytest.mark.parametrize("fused", [False, "compiled"])
def test_tensorflow_documentation_example(fused):
    # tf.keras.optimizers.RMSprop docs: learning_rate=0.1, var 10.0, loss var**2/2 -> 9.683772
    assert one_step_on_half_square(RMSprop.from_keras(learning_rate=0.1, fused=fused)) == (
        pytest.approx(9.683772, abs=1e-6)
    )


def test_same_example_under_other_conventions():
    # alpha 0.99, eps outside: v = 0.01*100 = 1, step 0.1*10/(1+1e-8) = 1 -> 9.0
    assert one_step_on_half_square(RMSprop.from_torch(lr=0.1)) == pytest.approx(9.0, abs=1e-6)
    assert one_step_on_half_square(RMSprop(0.1)) == pytest.approx(9.0, abs=1e-6)
    # TF1: v starts at 1 -> v = 0.9 + 10 = 10.9, step 0.1*10/sqrt(10.9) -> 9.697109
    assert one_step_on_half_square(RMSprop.from_tensorflow(learning_rate=0.1)) == pytest.approx(
        9.697109, abs=1e-6
    )


def test_keras_one_step_example():
    # keras/src/optimizers/rmsprop_test.py: RMSprop(learning_rate=0.5), x=[1,2,3,4], g=[1,6,7,2]
    optimizer = RMSprop.from_keras(learning_rate=0.5)
    x = mx.array([1.0, 2.0, 3.0, 4.0])
    new = optimizer.apply_gradients({"x": mx.array([1.0, 6.0, 7.0, 2.0])}, {"x": x})["x"]
    np.testing.assert_allclose(np.array(new), [-0.5811, 0.4189, 1.4189, 2.4189], atol=1e-4)
