"""The Rendering Model with factor-analyser noise, paper §5.1, Eq. 34.

Adding noise to a rendering step turns it into a factor analyser (paper §2.3,
footnotes 5-6, and §5.1, Eq. 34): ``I ~ N(Lambda(g) mu(c) + alpha(g), Psi)``
with a diagonal ``Psi``. Here the step is one level deep: a class ``c``, a
discrete nuisance ``g`` (a sub-type of the class), and a *continuous* nuisance
``z ~ N(0, I_q)`` that moves the image along ``q`` learned directions::

    image = mu_cg + Lambda_cg z + eps,    eps ~ N(0, diag(Psi_cg))

so that, with ``z`` integrated out, ``image | c, g ~ N(mu_cg, Lambda_cg
Lambda_cg^T + diag(Psi_cg))``: a mixture of factor analysers (MFA, the paper's
ref. 22). ``Lambda = 0`` and ``Psi = sigma^2`` give back the Gaussian RM of
Eqs. 3-4. The log-density uses the Woodbury identity (``O(D q^2)`` per
component instead of ``O(D^3)``); :func:`naive_fa_log_joint` is its twin with
the dense covariance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive
from numpyro.ops.indexing import Vindex

from pgm_drm._typing import Array, ArrayLike, PRNGKey, Semiring
from pgm_drm.models.pytree import pytree_model
from pgm_drm.models.validation import check_images, check_prior
from pgm_drm.semiring import reduce_t, resolve_temperature

__all__ = [
    "FactorRenderingModel",
    "fa_log_joint",
    "fa_log_normal",
    "naive_fa_log_joint",
    "woodbury_terms",
]


def woodbury_terms(loadings: Array, noise: Array) -> tuple[Array, Array]:
    """Eq. 34's covariance ``Lambda Lambda^T + Psi``, inverted by parts:
    ``Psi^-1 Lambda`` (``(..., D, q)``) and ``M = I_q + Lambda^T Psi^-1
    Lambda`` (``(..., q, q)``), the pieces of the Woodbury identity for
    ``(Lambda Lambda^T + Psi)^-1`` that the log-density, the ``z``-posterior
    (covariance ``M^-1``) and the M-step share."""
    lw = loadings / noise[..., None]
    m = jnp.eye(loadings.shape[-1]) + jnp.einsum("...dq,...dr->...qr", loadings, lw)
    return lw, m


def fa_log_normal(x: Array, mean: Array, loadings: Array, noise: Array) -> Array:
    """``log N(x_n; mu_k, Lambda_k Lambda_k^T + diag(Psi_k))`` for every n, k:
    Eq. 34 with ``z`` integrated out.

    Woodbury: with ``M_k = I_q + Lambda_k^T Psi_k^-1 Lambda_k``,
    ``r = x - mu_k`` and ``u = Lambda_k^T Psi_k^-1 r``, the quadratic form is
    ``r^T Psi^-1 r - u^T M^-1 u`` and ``log|C| = log|M| + sum log Psi``.

    Args:
        x: ``(N, D)`` flat images.
        mean: ``(K, D)``; loadings ``(K, D, q)``; noise ``(K, D)`` variances > 0.

    Returns:
        ``(N, K)``.
    """
    d = x.shape[-1]
    inv_psi = 1.0 / noise  # (K, D)
    lw, m = woodbury_terms(loadings, noise)  # Psi^-1 Lambda (K, D, q), M (K, q, q)
    chol = jnp.linalg.cholesky(m)  # (K, q, q)
    r = x[:, None, :] - mean[None]  # (N, K, D)
    u = jnp.einsum("nkd,kdq->nkq", r, lw)
    v = jax.vmap(
        lambda c, b: jax.scipy.linalg.solve_triangular(c, b.T, lower=True).T,
        in_axes=(0, 1),
        out_axes=1,
    )(chol, u)  # L^-1 u per component: (N, K, q)
    quad = jnp.einsum("nkd,kd->nk", r**2, inv_psi) - jnp.sum(v**2, -1)
    logdet = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
    logdet = logdet + jnp.sum(jnp.log(noise), -1)
    return -0.5 * (quad + logdet[None] + d * jnp.log(2 * jnp.pi))


def fa_log_joint(
    x: Array,
    templates: Array,
    loadings: Array,
    noise: Array,
    class_prior: Array,
    nuisance_prior: Array,
) -> Array:
    """``log p(c, g, I_n)`` with ``z`` integrated out (Eq. 34), shape ``(N, C, G)``.

    Args:
        x: ``(N, D)`` flat images; templates ``(C, G, D)``; loadings
            ``(C, G, D, q)``; noise ``(C, G, D)``; priors ``(C,)``, ``(G,)``.
    """
    c, g, d = templates.shape
    q = loadings.shape[-1]
    lp = fa_log_normal(
        x,
        templates.reshape(c * g, d),
        loadings.reshape(c * g, d, q),
        noise.reshape(c * g, d),
    ).reshape(-1, c, g)
    return lp + jnp.log(class_prior)[:, None] + jnp.log(nuisance_prior)[None, :]


def naive_fa_log_joint(model: FactorRenderingModel, images: ArrayLike) -> np.ndarray:
    """Twin of :meth:`FactorRenderingModel.log_joint` (Eq. 34): every ``(c, g)``
    scored by ``scipy.stats.multivariate_normal`` with the dense covariance, in
    float64."""
    from scipy.stats import multivariate_normal

    x, _ = check_images(images, model.image_shape)
    x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    shape = (model.n_classes, model.n_nuisances, -1)
    mu = np.asarray(model.templates, np.float64).reshape(shape)
    lam = np.asarray(model.loadings, np.float64)
    psi = np.asarray(model.noise, np.float64).reshape(shape)
    pc = np.log(np.asarray(model.class_prior, np.float64))
    pg = np.log(np.asarray(model.nuisance_prior, np.float64))
    out = np.empty((x.shape[0], model.n_classes, model.n_nuisances))
    for c in range(model.n_classes):
        for g in range(model.n_nuisances):
            cov = lam[c, g] @ lam[c, g].T + np.diag(psi[c, g])
            out[:, c, g] = multivariate_normal(mu[c, g], cov).logpdf(x) + pc[c] + pg[g]
    return out


@pytree_model()
@dataclass(frozen=True, eq=False)
class FactorRenderingModel:
    """Rendering Model whose noisy rendering step is a factor analyser (Eq. 34).

    ``c ~ Cat(class_prior)``, ``g ~ Cat(nuisance_prior)``, ``z ~ N(0, I_q)``,
    ``image ~ N(templates[c, g] + loadings[c, g] @ z, diag(noise[c, g]))``.

    Args:
        templates: ``mu_cg``, shape ``(C, G, *image_shape)``.
        loadings: ``Lambda_cg``, shape ``(C, G, D, q)`` with ``D`` the number
            of pixels and ``1 <= q < D`` factors (the continuous nuisance).
        noise: Diagonal ``Psi_cg`` (pixel noise *variances*, > 0), shape
            ``(C, G, *image_shape)``.
        class_prior, nuisance_prior: ``(C,)`` and ``(G,)``; uniform when ``None``.

    A JAX pytree (:func:`~pgm_drm.models.pytree.pytree_model`): every field is a
    parameter leaf, so the model is an ordinary argument of ``jax.jit`` and a new
    parameter value of the same shapes reuses the compiled program. Validation
    runs when a model is built (``__post_init__``), never on the tracers of
    ``jit`` or ``grad``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> frm = FactorRenderingModel(
        ...     jnp.zeros((2, 1, 3, 3)), 0.1 * jnp.ones((2, 1, 9, 2)),
        ...     0.04 * jnp.ones((2, 1, 3, 3)))
        >>> images, latents = frm.sample(jax.random.PRNGKey(0), 5)
        >>> images.shape, sorted(latents), latents["z"].shape
        ((5, 3, 3), ['c', 'g', 'z'], (5, 2))
    """

    templates: ArrayLike
    loadings: ArrayLike
    noise: ArrayLike
    class_prior: ArrayLike | None = None
    nuisance_prior: ArrayLike | None = None

    def __post_init__(self) -> None:
        mu = jnp.asarray(self.templates)
        if not jnp.issubdtype(mu.dtype, jnp.floating):
            mu = mu.astype(jnp.result_type(float))  # int templates: no truncation
        if mu.ndim < 3:
            raise ValueError(
                f"templates must have shape (C, G, *image_shape), got {mu.shape}"
            )
        c, g = mu.shape[:2]
        d = int(np.prod(mu.shape[2:]))
        lam = jnp.asarray(self.loadings, dtype=mu.dtype)
        if lam.ndim != 4 or lam.shape[:3] != (c, g, d) or not 1 <= lam.shape[3] < d:
            raise ValueError(
                f"loadings must have shape (C, G, D, q) = ({c}, {g}, {d}, q) with "
                f"1 <= q < {d}, got {lam.shape}"
            )
        psi = jnp.asarray(self.noise, dtype=mu.dtype)
        if psi.shape != mu.shape:
            raise ValueError(
                f"noise (pixel variances) must have the templates' shape "
                f"{mu.shape}, got {psi.shape}"
            )
        for name, a in (("templates", mu), ("loadings", lam), ("noise", psi)):
            if not bool(jnp.all(jnp.isfinite(a))):
                raise ValueError(f"{name} contain NaN or inf values")
        if not bool(jnp.all(psi > 0)):
            raise ValueError("noise must hold pixel variances > 0")
        pc = np.full(c, 1.0 / c) if self.class_prior is None else self.class_prior
        pg = np.full(g, 1.0 / g) if self.nuisance_prior is None else self.nuisance_prior
        object.__setattr__(self, "templates", mu)
        object.__setattr__(self, "loadings", lam)
        object.__setattr__(self, "noise", psi)
        object.__setattr__(self, "class_prior", check_prior(pc, "class_prior", c))
        object.__setattr__(self, "nuisance_prior", check_prior(pg, "nuisance_prior", g))

    @property
    def n_classes(self) -> int:
        return int(self.templates.shape[0])

    @property
    def n_nuisances(self) -> int:
        return int(self.templates.shape[1])

    @property
    def n_factors(self) -> int:
        """``q``, the dimension of the continuous nuisance ``z``."""
        return int(self.loadings.shape[-1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.templates.shape[2:])

    def flat_parameters(self) -> tuple[Array, Array]:
        """``templates`` and ``noise`` with the pixels flattened: ``(C, G, D)`` each."""
        c, g = self.templates.shape[:2]
        return self.templates.reshape(c, g, -1), self.noise.reshape(c, g, -1)

    def model(self, image: ArrayLike | None = None, collapsed: bool = False) -> None:
        """The NumPyro model (Eq. 34).

        Sites ``c``, ``g``, ``z`` (``Normal(0, 1)``, event ``(q,)``) and
        ``image`` (Normal, event over all pixels). With ``collapsed=True`` the
        continuous ``z`` is integrated out analytically and ``image`` is a
        ``MultivariateNormal`` with covariance ``Lambda Lambda^T + diag(Psi)``,
        so NumPyro's enumeration of the discrete ``c, g`` is exact.
        """
        if image is not None and jnp.shape(image) != self.image_shape:
            raise ValueError(
                f"model() takes one image of shape {self.image_shape}, got "
                f"{jnp.shape(image)}; score a batch with log_joint()"
            )
        mu, psi = self.flat_parameters()
        c = numpyro.sample("c", dist.Categorical(self.class_prior))
        g = numpyro.sample("g", dist.Categorical(self.nuisance_prior))
        lam = Vindex(self.loadings)[c, g]
        obs = None if image is None else jnp.reshape(image, (-1,))
        if collapsed:
            eye = jnp.eye(psi.shape[-1], dtype=psi.dtype)
            cov = lam @ jnp.swapaxes(lam, -1, -2) + Vindex(psi)[c, g][..., None] * eye
            flat = numpyro.sample(
                "image",
                dist.MultivariateNormal(Vindex(mu)[c, g], covariance_matrix=cov),
                obs=obs,
            )
            return jnp.reshape(flat, self.image_shape)
        z = numpyro.sample(
            "z", dist.Normal(0.0, 1.0).expand([self.n_factors]).to_event(1)
        )
        mean = Vindex(mu)[c, g] + jnp.einsum("...dq,...q->...d", lam, z)
        flat = numpyro.sample(
            "image",
            dist.Normal(mean, jnp.sqrt(Vindex(psi)[c, g])).to_event(1),
            obs=obs,
        )
        return jnp.reshape(flat, self.image_shape)

    def sample(self, key: PRNGKey, n: int) -> tuple[Array, dict[str, Array]]:
        """Draw ``n`` images with their latents ``c``, ``g`` (``(n,)``) and
        ``z`` (``(n, q)``) from the model itself."""
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        draws = Predictive(self.model, num_samples=int(n))(key)
        images = draws.pop("image").reshape((int(n),) + self.image_shape)
        return images, draws

    def log_joint(self, images: ArrayLike) -> Array:
        """Exact ``log p(c, g, I_n)`` (``z`` integrated out), shape ``(N, C, G)``
        (``(C, G)`` for one image)."""
        x, single = check_images(images, self.image_shape)
        mu, psi = self.flat_parameters()
        t = fa_log_joint(
            x.reshape(x.shape[0], -1),
            mu,
            self.loadings,
            psi,
            self.class_prior,
            self.nuisance_prior,
        )
        return t[0] if single else t

    def log_likelihood(self, images: ArrayLike) -> Array:
        """Exact ``log p(I_n)``, shape ``(N,)``."""
        t = self.log_joint(images)
        return jax.nn.logsumexp(t.reshape(t.shape[:-2] + (-1,)), axis=-1)

    def class_log_scores(self, images: ArrayLike, semiring: Semiring = "sum") -> Array:
        """``log p(c, I)`` (sum over ``g``, Eq. 5) or ``max_g log p(c, g, I)``
        (max, Eq. 6); ``z`` is always integrated out. Shape ``(N, C)``."""
        t = resolve_temperature(semiring, None)
        return reduce_t(self.log_joint(images), (-1,), t)

    def classify(self, images: ArrayLike, semiring: Semiring = "sum") -> Array:
        """Class decisions ``argmax_c`` of :meth:`class_log_scores`."""
        return jnp.argmax(self.class_log_scores(images, semiring), axis=-1)

    def factor_posterior(self, images: ArrayLike) -> tuple[Array, Array]:
        """``p(z | c, g, I) = N(m, V)``: means ``(N, C, G, q)`` and covariances
        ``(C, G, q, q)``, ``V = M^-1``, ``m = V Lambda^T Psi^-1 (I - mu)``."""
        x, _ = check_images(images, self.image_shape)
        mu, psi = self.flat_parameters()
        lw, m_prec = woodbury_terms(self.loadings, psi)
        v = jnp.linalg.inv(m_prec)
        r = x.reshape(x.shape[0], 1, 1, -1) - mu[None]
        m = jnp.einsum("cgqr,ncgr->ncgq", v, jnp.einsum("ncgd,cgdq->ncgq", r, lw))
        return m, v

    def replace(self, **changes: Any) -> FactorRenderingModel:
        """A copy with some parameters replaced (validated again; learning loops
        use :func:`pgm_drm.models.pytree.replace`, which skips the checks)."""
        fields = {
            "templates": self.templates,
            "loadings": self.loadings,
            "noise": self.noise,
            "class_prior": self.class_prior,
            "nuisance_prior": self.nuisance_prior,
        }
        return FactorRenderingModel(**{**fields, **changes})
