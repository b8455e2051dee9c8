"""Gradient-boosting objectives: an elementwise loss's gradient and second derivative, from
one fused pass (`grad_hess`), in the signatures XGBoost and LightGBM call.

    obj = losses.log_cosh().xgboost_objective()
    xgboost.train(params, dtrain, obj=obj.obj)            # (predt, dtrain)
    xgboost.XGBRegressor(objective=obj)                   # (y_true, y_pred, *, sample_weight)
    fobj = losses.HuberLoss().lightgbm_objective()
    lightgbm.train({"objective": fobj.obj, ...}, train)   # (preds, train_data)
    lightgbm.LGBMRegressor(objective=fobj)                # (y_true, y_pred, weight)

The prediction is the booster's raw margin; the gradient and second derivative are of each
sample's own loss (a loss built with reduction 'mean' or 'sum' is used per sample here: a
booster sums them itself), times the sample's weight (a custom objective must apply the
weights: neither library does it for one), times the loss's `weight`. To match a built-in
objective, start from the same margin: XGBoost's `base_score` is a probability for
binary:logistic but the margin itself for a custom objective (base_score=0.5 there is 0
here), and LightGBM's built-in objectives start from the label average unless
`boost_from_average=False`.

Module-level classes of plain attributes, not closures: they pickle with the loss.
"""

from __future__ import annotations

import numpy as np

__all__ = ["XGBoostObjective", "LightGBMObjective"]


def _per_sample(loss):
    """`loss` with reduction 'none' (the same loss otherwise)."""
    if loss._rows:
        raise TypeError(f"{loss._display}: boosting objectives are for elementwise losses (a row "
                        f"loss's second derivative is not diagonal)")
    return loss if loss.reduction == "none" else loss._replace(reduction="none")


def _grad_hess(loss, pred, label, weight):
    pred = np.asarray(pred)
    label = np.asarray(label, dtype=pred.dtype).reshape(pred.shape)
    weight = None if weight is None or np.size(weight) == 0 else np.asarray(weight, dtype=pred.dtype)
    if weight is not None and pred.ndim == 2 and weight.ndim == 1:  # one weight per sample (row)
        weight = weight[:, None]
    return loss.grad_hess(pred, label, sample_weight=weight)


class XGBoostObjective:
    """An XGBoost custom objective: call it as XGBoost's scikit-learn interface does, or pass
    its `obj` method to `xgboost.train`."""

    def __init__(self, loss):
        self.loss = _per_sample(loss)

    def __call__(self, y_true, y_pred, *, sample_weight=None):
        return _grad_hess(self.loss, y_pred, y_true, sample_weight)

    def obj(self, predt, dtrain):
        return _grad_hess(self.loss, predt, dtrain.get_label(), dtrain.get_weight())

    def __repr__(self):
        return f"XGBoostObjective({self.loss!r})"


class LightGBMObjective:
    """A LightGBM custom objective: call it as LightGBM's scikit-learn interface does (three
    parameters: it dispatches on their number), or pass its `obj` method as the `objective`
    of `lightgbm.train`."""

    def __init__(self, loss):
        self.loss = _per_sample(loss)

    def __call__(self, y_true, y_pred, weight):
        return _grad_hess(self.loss, y_pred, y_true, weight)

    def obj(self, preds, train_data):
        return _grad_hess(self.loss, preds, train_data.get_label(), train_data.get_weight())

    def __repr__(self):
        return f"LightGBMObjective({self.loss!r})"
