"""Generative vs discriminative as the labels grow (paper §2.7).

:func:`label_budget_curve` fits the RM by supervised hard EM on a label budget,
relaxes it (Eq. 25) and trains the relaxation on the same labels;
:func:`plot_label_budget` draws the two accuracy curves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from pgm_drm._random import np_rng
from pgm_drm._typing import PRNGKey
from pgm_drm.learning.discriminative import fit_discriminative, predict
from pgm_drm.learning.em import fit_em
from pgm_drm.learning.loop import LoopOptions

__all__ = ["LabelBudgetResult", "label_budget_curve", "plot_label_budget"]


class LabelBudgetResult(NamedTuple):
    """Test accuracies per label budget (§2.7's bias-variance trade-off).

    Attributes:
        n_labels: ``(B,)`` labelled training images used.
        generative: ``(B, R)`` test accuracy of the RM's MS-RMC, per repeat.
        discriminative: ``(B, R)`` of its relaxation trained on the same labels.
    """

    n_labels: np.ndarray
    generative: np.ndarray
    discriminative: np.ndarray


def _budget_subset(y: np.ndarray, n: int, n_classes: int, rng) -> np.ndarray:
    """``n`` indices, as balanced over classes as possible (>= 1 per class)."""
    per = [rng.permutation(np.flatnonzero(y == c)) for c in range(n_classes)]
    take = [min(len(p), max(1, n // n_classes)) for p in per]
    chosen = [p[:t] for p, t in zip(per, take, strict=True)]
    rest = rng.permutation(
        np.concatenate([p[t:] for p, t in zip(per, take, strict=True)])
    )
    extra = max(n - sum(take), 0)
    return np.sort(np.concatenate(chosen + [rest[:extra]]))


def label_budget_curve(
    n_labels: tuple[int | None, ...] = (20, 50, 100, 200, 500, None),
    *,
    data: Any = None,
    n_nuisances: int = 10,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    repeats: int = 1,
    key: PRNGKey | None = None,
    progress: bool = True,
) -> LabelBudgetResult:
    """Generative RM vs its discriminative relaxation as labels grow (§2.7).

    For each budget ``n`` (``None``: every training label) and repeat: draw a
    class-balanced subset of ``n`` labelled training images, fit the RM with
    :func:`pgm_drm.learning.fit_em` (supervised hard EM, Eqs. 16-17 with ``c``
    clamped by the labels; ``G = n_nuisances`` templates per class; ``sigma``
    floored at 0.05 so that tiny budgets do not collapse onto their images),
    then relax it (:func:`pgm_drm.learning.init_from_rm`) and train on the same
    ``n`` images for ``steps`` minibatch steps (no validation split: the budget
    is all the labels there are), after temperature-scaling its saturated scores
    (:func:`pgm_drm.learning.calibrate_scale`, which keeps the generative
    decisions).

    Args:
        n_labels: Budgets; ``None`` for all.
        data: A :class:`pgm_drm.data.DigitsSplit`-like 4-tuple; default
            :func:`pgm_drm.data.load_digits_split`.
        n_nuisances: ``G``.
        steps: Adam steps per fit (epochs = ``ceil(steps * batch / n)``).
        batch_size, lr, weight_decay: As
            :func:`pgm_drm.learning.fit_discriminative`.
        repeats: Independent subsets per budget.
        key: PRNG key.
        progress: An outer tqdm bar over the fits.

    Returns:
        :class:`LabelBudgetResult`.
    """
    if data is None:
        from pgm_drm.data import load_digits_split

        data = load_digits_split()
    x_tr, y_tr, x_te, y_te = (np.asarray(a) for a in data)
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    key = jax.random.PRNGKey(0) if key is None else key
    budgets = [len(y_tr) if n is None else min(int(n), len(y_tr)) for n in n_labels]
    gen = np.zeros((len(budgets), repeats))
    dis = np.zeros((len(budgets), repeats))
    bar = tqdm(total=len(budgets) * repeats, disable=not progress, desc="budgets")
    for i, n in enumerate(budgets):
        for r in range(repeats):
            key, k_sub, k_gen, k_fit = jax.random.split(key, 4)
            rng = np_rng(k_sub)
            idx = _budget_subset(y_tr, n, n_classes, rng)
            rm = fit_em(
                x_tr[idx],
                n_classes,
                n_nuisances,
                mode="hard",
                labels=y_tr[idx],
                n_iter=30,
                key=k_gen,
                min_sigma=0.05,
                loop=LoopOptions(progress=False),
            ).model
            gen[i, r] = float(np.mean(np.asarray(rm.classify(x_te)) == y_te))
            bs = min(batch_size, len(idx))
            epochs = int(np.ceil(steps / max(len(idx) // bs, 1)))
            fit = fit_discriminative(
                rm,
                x_tr[idx],
                y_tr[idx],
                epochs=epochs,
                batch_size=bs,
                lr=lr,
                weight_decay=weight_decay,
                key=k_fit,
                calibrate=True,
                loop=LoopOptions(progress=False),
            )
            dis[i, r] = float(np.mean(np.asarray(predict(fit.net, x_te)) == y_te))
            bar.set_postfix(n=n, gen=f"{gen[i, r]:.3f}", dis=f"{dis[i, r]:.3f}")
            bar.update()
    bar.close()
    return LabelBudgetResult(np.asarray(budgets), gen, dis)


def plot_label_budget(result: LabelBudgetResult, ax: Any = None):
    """Test accuracy vs number of labels, generative vs discriminative.

    Returns:
        The matplotlib ``Figure`` (mean over repeats, min-max band).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    n = result.n_labels
    for name, acc, style in (
        ("generative (RM, MS-RMC)", result.generative, "o-"),
        ("discriminative relaxation", result.discriminative, "s-"),
    ):
        ax.plot(n, acc.mean(1), style, label=name)
        if acc.shape[1] > 1:
            ax.fill_between(n, acc.min(1), acc.max(1), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy")
    ax.set_title("Generative vs discriminative (§2.7)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
