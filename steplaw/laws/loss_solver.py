"""The loss law's optimizer: the weighted Huber objective on log loss and its minimizers.

Parameters are theta = (a, b, e, alpha, beta) with log L_hat = LSE(a - alpha ln N,
b - beta ln D, e) (steplaw.laws.loss). A fit may move theta only inside a subspace
theta = start + Q x, Q a (5, k) basis: a refused term or a fixed E leaves its
coordinates out of Q, a tied form (alpha = beta) has one column e_alpha + e_beta
(steplaw.laws.loss_forms builds Q). `asym` >= 1 multiplies the weight of every cell the
law predicts too low (log L_hat < log L): the asymmetric penalty on under-predicting
the loss. The objective stays continuous with a continuous gradient, since the Huber
term and its slope vanish at a zero residual.

Two minimizers of the same objective: `fit_once`, scipy BFGS from several starts (the
point fit), and `fit_batch`, BFGS vectorized over bootstrap resamples (weights rows).
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize

# Grid of starting points (Hoffmann et al. 2022 App. D.2 use a similar grid).
GRID = {
    "a": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "b": [0.0, 5.0, 10.0, 15.0, 20.0, 25.0],
    "e": [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5],
    "alpha": [0.0, 0.5, 1.0, 1.5, 2.0],
    "beta": [0.0, 0.5, 1.0, 1.5, 2.0],
}
_BFGS_ITERATIONS = 200
# A resample stops when no parameter moves by _STEP_TOL (exponents to ~1e-6, far below
# the bootstrap's own Monte Carlo error) or a step gains under _GAIN_TOL of the objective.
_STEP_TOL, _GAIN_TOL = 1e-6, 1e-10
_LINE_SEARCH_HALVINGS = 30
FULL = np.eye(5)


def projection(basis) -> np.ndarray:
    """The orthogonal projection (5, 5) onto the span of the basis columns, which are
    mutually orthogonal (steplaw.laws.loss_forms builds them so): a sum of q q^T / |q|^2."""
    q = FULL if basis is None else np.asarray(basis, float)
    return sum(np.outer(column, column) / (column @ column) for column in q.T)


def _asym_weights(resid, weights, asym: float):
    """Weights with the under-prediction factor applied (resid = log L_hat - log L)."""
    return weights if asym == 1.0 else weights * np.where(resid < 0, asym, 1.0)


def lse_terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])


def objective(theta, log_n, log_d, log_loss, weights, delta, asym: float = 1.0):
    """Weighted Huber objective and its gradient (5,) at one theta."""
    terms = lse_terms(theta, log_n, log_d)
    top = terms.max(axis=0)
    exp = np.exp(terms - top)
    total = exp.sum(axis=0)
    pred = top + np.log(total)
    soft = exp / total
    resid = pred - log_loss
    weights = _asym_weights(resid, weights, asym)
    small = np.abs(resid) <= delta
    # Scaled by 1/delta^2 so the objective is O(1) for the optimizer tolerances.
    huber = np.where(small, 0.5 * resid**2, delta * (np.abs(resid) - 0.5 * delta)) / delta**2
    dres = np.where(small, resid, delta * np.sign(resid)) / delta**2 * weights
    grad = np.array([
        np.sum(dres * soft[0]),
        np.sum(dres * soft[1]),
        np.sum(dres * soft[2]),
        -np.sum(dres * soft[0] * log_n),
        -np.sum(dres * soft[1] * log_d),
    ])
    return float(np.sum(weights * huber)), grad


def grid_objective(log_n, log_d, log_loss, delta, starts: np.ndarray, weights=None, asym: float = 1.0):
    """The objective of each start row (S, 5) (grid points already put inside the fit's subspace)."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n[None], b - beta * log_d[None], np.broadcast_to(e, (len(starts), log_n.size))])
    pred = np.logaddexp.reduce(terms, axis=0)
    resid = pred - log_loss[None]
    weights = _asym_weights(resid, np.ones_like(log_n) if weights is None else weights, asym)
    absr = np.abs(resid)
    return (weights * np.where(absr <= delta, 0.5 * absr**2, delta * (absr - 0.5 * delta))).sum(axis=1)


def grid_starts() -> np.ndarray:
    return np.array(list(itertools.product(*GRID.values())))


def fit_once(log_n, log_d, log_loss, weights, starts, delta, basis=None, asym: float = 1.0) -> np.ndarray:
    """The best of BFGS runs from `starts`, each moving theta = start + Q x (Q = `basis`,
    default all five parameters)."""
    q = FULL if basis is None else np.asarray(basis, float)
    best, best_value = None, np.inf
    for start in starts:
        base = np.array(start, float)

        def fun(x, base=base):
            value, grad = objective(base + q @ x, log_n, log_d, log_loss, weights, delta, asym)
            return value, q.T @ grad

        # Quasi-Newton with full BFGS: with 5 parameters it is what L-BFGS computes, and
        # scipy's L-BFGS-B driver was 10-30x slower here (it spends its time in threaded
        # BLAS calls on tiny vectors when the cores are busy).
        result = minimize(fun, np.zeros(q.shape[1]), jac=True, method="BFGS", options={"maxiter": 2000, "gtol": 1e-9})
        if result.fun < best_value:
            best, best_value = base + q @ result.x, result.fun
    return best


def _batched_prediction(theta, log_n, log_d):
    """log L_hat (B, n) and the shares of its three terms, for parameter rows theta (B, 5).

    The terms are exponentiated directly (two exp and one log per point instead of a
    shifted log-sum-exp): for any plausible loss law they lie far inside float range, and
    the clip at +-300 only keeps a wild resample finite.
    """
    u0 = np.exp(np.clip(theta[:, 0:1] - theta[:, 3:4] * log_n, -300.0, 300.0))
    u1 = np.exp(np.clip(theta[:, 1:2] - theta[:, 4:5] * log_d, -300.0, 300.0))
    u2 = np.exp(np.clip(theta[:, 2:3], -300.0, 300.0))
    total = u0 + u1 + u2
    inverse = 1.0 / total
    return np.log(total), (u0 * inverse, u1 * inverse, u2 * inverse)


def _huber(resid, weights, delta) -> np.ndarray:
    absr = np.abs(resid)
    return np.sum(weights * np.where(absr <= delta, 0.5 * resid * resid, delta * (absr - 0.5 * delta)), axis=1)


def _batched_state(theta, log_n, log_d, log_loss, weights, delta, asym):
    """Objective (B,), gradient (B, 5) and IRLS normal matrix (B, 5, 5) of every resample."""
    pred, (s0, s1, s2) = _batched_prediction(theta, log_n, log_d)
    resid = pred - log_loss
    weights = _asym_weights(resid, weights, asym)
    jac_t = np.stack([s0, s1, s2, -s0 * log_n, -s1 * log_d], axis=1)  # (B, 5, n)
    psi = np.clip(resid, -delta, delta) * weights
    irls = weights * np.minimum(1.0, delta / np.maximum(np.abs(resid), 1e-300))
    grad = np.matmul(jac_t, psi[..., None])[..., 0]  # batched matrix products, not einsum loops
    normal = np.matmul(jac_t * irls[:, None, :], jac_t.transpose(0, 2, 1))
    return _huber(resid, weights, delta), grad, normal


def _batched_value_grad(theta, log_n, log_d, log_loss, weights, delta, asym):
    """Objective (B,) and gradient (B, 5) of every resample."""
    pred, (s0, s1, s2) = _batched_prediction(theta, log_n, log_d)
    resid = pred - log_loss
    weights = _asym_weights(resid, weights, asym)
    psi = np.clip(resid, -delta, delta) * weights
    p0, p1 = psi * s0, psi * s1
    grad = np.stack([p0.sum(1), p1.sum(1), (psi * s2).sum(1), -(p0 @ log_n), -(p1 @ log_d)], axis=1)
    return _huber(resid, weights, delta), grad


def fit_batch(log_n, log_d, log_loss, weights: np.ndarray, start: np.ndarray, delta: float, basis=None,
              asym: float = 1.0) -> np.ndarray:
    """Minimize the weighted Huber objective for every row of `weights` (B, n) from `start`:
    BFGS on all rows at once (the method of the point fit, vectorized), its inverse
    Hessian started from the IRLS normal matrix, with a backtracking Armijo line search
    per row. A row stops when a step moves no parameter by _STEP_TOL or gains less than
    _GAIN_TOL of its objective. theta moves only inside the span of `basis`: gradients
    and the inverse Hessian are projected onto it, so every BFGS step stays there (up to
    rounding: the caller puts the rows back exactly, steplaw.laws.loss_forms.LossForm.place)."""
    count = weights.shape[0]
    proj = projection(basis)
    theta = np.repeat(start[None, :], count, axis=0)
    value, grad, normal = _batched_state(theta, log_n, log_d, log_loss, weights, delta, asym)
    grad = grad @ proj
    eye = np.eye(5)
    normal = proj @ normal @ proj + (eye - proj)  # outside the subspace: identity, no coupling
    scale = np.einsum("bii->bi", normal).max(axis=1)[:, None, None]
    hinv = proj @ np.linalg.inv(normal + 1e-6 * scale * eye) @ proj
    active = np.arange(count)
    for _ in range(_BFGS_ITERATIONS):
        if active.size == 0:
            break
        direction = -np.matmul(hinv[active], grad[active][..., None])[..., 0]
        slope = np.sum(direction * grad[active], axis=1)
        step_size = np.ones(active.size)
        accepted = np.zeros(active.size, dtype=bool)
        new_theta, new_value, new_grad = theta[active].copy(), value[active].copy(), grad[active].copy()
        for _ in range(_LINE_SEARCH_HALVINGS):  # backtracking: only rows not yet accepted are evaluated
            todo = np.flatnonzero(~accepted)
            if todo.size == 0:
                break
            trial = theta[active[todo]] + step_size[todo, None] * direction[todo]
            t_value, t_grad = _batched_value_grad(trial, log_n, log_d, log_loss, weights[active[todo]], delta, asym)
            t_grad = t_grad @ proj
            ok = t_value <= value[active[todo]] + 1e-4 * step_size[todo] * slope[todo]
            hit = todo[ok]
            new_theta[hit], new_value[hit], new_grad[hit] = trial[ok], t_value[ok], t_grad[ok]
            accepted[hit] = True
            step_size[todo[~ok]] *= 0.5
        s_vec = new_theta - theta[active]
        y_vec = new_grad - grad[active]
        sy = np.sum(s_vec * y_vec, axis=1)
        update = accepted & (sy > 1e-12 * np.linalg.norm(s_vec, axis=1) * np.linalg.norm(y_vec, axis=1) + 1e-300)
        if update.any():
            rows = active[update]
            rho = 1.0 / sy[update]
            left = eye - rho[:, None, None] * s_vec[update][:, :, None] * y_vec[update][:, None, :]
            hinv[rows] = np.matmul(np.matmul(left, hinv[rows]), left.transpose(0, 2, 1)) + \
                rho[:, None, None] * s_vec[update][:, :, None] * s_vec[update][:, None, :]
        gain = value[active] - new_value
        stalled = ~accepted | (np.abs(s_vec).max(axis=1) < _STEP_TOL) | (gain <= _GAIN_TOL * value[active])
        theta[active], value[active], grad[active] = new_theta, new_value, new_grad
        active = active[~stalled]
    return theta
