"""The README's quickstart, run as written by tests/test_examples.py (after `losscc build specs/`)."""

import numpy as np

import losscc

gloss = losscc.load("build/losses")
loss = gloss.L2Loss()
x = np.ones(2)
y = np.ones(2) * 2
print(loss(x, y))                         # [0.5 0.5]   = 0.5 * (x - y)**2
print(loss(x, y, np.array([1.0, 2.0])))   # [0.5 1. ]   sample weights
value, grad = loss.value_and_grad(x, y)   # one fused C pass; grad = d sum(value) / d x
print(value, grad)                        # [0.5 0.5] [-1. -1.]

huber = gloss.HuberLoss(rho=0.5, reduction="mean")
print(huber(np.array([0.0, 3.0]), np.array([0.2, 1.0])))  # mean of 0.04 and 1.75 = 0.895
