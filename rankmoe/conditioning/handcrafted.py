"""Weight-free degradation estimator: hand-crafted measures, each mapped to ``[0, 1]`` by a fixed calibration.

The default when no CLIP weights are at hand. Four dimensions, each a classical measure from
:mod:`rankmoe.conditioning.measures` (vectorised torch, float32, no weights, no downloads) passed through a
documented logistic :class:`Calibration`:

| dimension | raw measure | calibration (score 0.5 at, width) |
|---|---|---|
| ``blur`` | :func:`~rankmoe.conditioning.measures.edge_blur`, px | 2.0 px, 0.25 px |
| ``noise`` | :func:`~rankmoe.conditioning.measures.noise_level`, 8-bit levels | 4.0 levels, 0.4 in ``log`` |
| ``jpeg`` | :func:`~rankmoe.conditioning.measures.blockiness`, log ratio | 0.30, 0.07 |
| ``resolution`` | :func:`~rankmoe.conditioning.measures.resolution_loss`, nats | 1.5, 0.5 |

Where the constants come from: the raw measures of five colour photographs shipped in the scikit-image wheel
(``astronaut``, ``coffee``, ``chelsea``, ``rocket``, ``stereo_motorcycle`` left view; 256 x 256 centre crops,
8-bit) clean and under the synthetic degradation sweeps of ``tests/test_handcrafted_estimator.py`` (Gaussian blur
sigma 0-3 px, Gaussian noise sigma 0-25 levels, JPEG quality 95-10, bicubic down-and-up scaling x1-x4). Each
midpoint sits between the clean photographs and the middle of its own sweep, and each width keeps the clean
photographs near 0 and the strongest level near 1 while the cross-talk of the *other* sweeps stays small (for
example ``blur`` at 2.0 px: clean photographs measure 0.3 px on average, at most 0.9; x4 down-scaling 1.6 px,
at most 1.9; a 3 px blur 2.7 px). The measured numbers are on the reference page
``docs/reference/conditioning-handcrafted.md``. They were set by hand on these photographs (and checked on
photographs from scikit-learn and matplotlib); they are not fitted on any image-quality data set.

Axis legend: ``b`` images, ``h`` / ``w`` height and width, ``D`` dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from rankmoe.conditioning.base import DegradationEstimator, SeverityRule, check_severity_rule
from rankmoe.conditioning.measures import measure as raw_measures


@dataclass(frozen=True)
class Calibration:
    """A logistic map from a raw measure to a score in ``[0, 1]``.

    ``score = sigmoid((t(raw) - t(midpoint)) / scale)`` with ``t = log`` when ``log`` is set (``raw`` clamped to
    at least ``1e-3`` first), else the identity: the score is 0.5 at ``midpoint``, 0.27 / 0.73 one ``scale`` below /
    above it and 0.047 / 0.953 three ``scale`` away.

    Args:
        midpoint: Raw value that scores 0.5 (in the raw measure's unit; positive when ``log``).
        scale: Width of the transition: raw units, or natural-log units when ``log``; positive.
        log: Calibrate ``log(raw)`` instead of ``raw`` (for scale-like measures such as a noise sigma).

    Raises:
        ValueError: For a non-finite midpoint, a non-positive scale, or a non-positive midpoint with ``log``.

    Example:
        >>> Calibration(midpoint=2.0, scale=0.25)(torch.tensor([2.0, 2.75]))
        tensor([0.5000, 0.9526])
    """

    midpoint: float
    scale: float
    log: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.midpoint) or (self.log and self.midpoint <= 0):
            raise ValueError(f"midpoint must be finite (and positive with log=True), got {self.midpoint!r}")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {self.scale!r}")

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """Scores ``(...)`` in ``[0, 1]`` of raw measures ``(...)`` (same shape, dtype and device)."""
        if self.log:
            return torch.sigmoid((raw.clamp_min(1e-3).log() - math.log(self.midpoint)) / self.scale)
        return torch.sigmoid((raw - self.midpoint) / self.scale)


DEFAULT_CALIBRATION: dict[str, Calibration] = {
    "blur": Calibration(midpoint=2.0, scale=0.25),
    "noise": Calibration(midpoint=4.0, scale=0.4, log=True),
    "jpeg": Calibration(midpoint=0.30, scale=0.07),
    "resolution": Calibration(midpoint=1.5, scale=0.5),
}
"""The calibration of each dimension of :class:`WeightFreeDegradationEstimator` (see the module docstring).

- ``blur`` (:func:`~rankmoe.conditioning.measures.edge_blur`, px): 0.5 at 2.0 px, width 0.25 px. Clean
  photographs 0.3 px on average (score about 0.001), a 2 px Gaussian blur 1.9 px (0.4), 3 px 2.7 px (0.95).
- ``noise`` (:func:`~rankmoe.conditioning.measures.noise_level`, 8-bit levels): 0.5 at 4 levels, width 0.4 in
  ``log``. Clean photographs read 0.3-1.8 levels of texture (at most 0.11); Gaussian noise of sigma 2 / 5 / 10 / 25
  levels (out of 255) reads 2.5 / 5.1 / 9.7 / 23 levels (0.24 / 0.65 / 0.90 / 0.99).
- ``jpeg`` (:func:`~rankmoe.conditioning.measures.blockiness`): 0.5 at 0.30, width 0.07. Clean photographs
  about 0.08 (0.04); JPEG quality 75 / 50 / 10 reads 0.18 / 0.31 / 0.77 (0.14 / 0.54 / 0.999).
- ``resolution`` (:func:`~rankmoe.conditioning.measures.resolution_loss`, nats): 0.5 at 1.5, width 0.5. Clean
  photographs about 0 (0.05); bicubic down-and-up scaling x1.5 / x2 / x4 reads 1.4 / 2.3 / 5.0 (0.45 / 0.83 /
  0.999).
"""


class WeightFreeDegradationEstimator(DegradationEstimator):
    """Degradation scores from hand-crafted measures: no weights, no downloads, vectorised torch.

    The default estimator when no CLIP checkpoint is at hand (MoR's own estimator is CLIP-based, see
    :class:`~rankmoe.conditioning.clip.ClipDegradationEstimator`); it returns the same
    :class:`~rankmoe.conditioning.base.DegradationScores`, so routing code does not change. Dimensions (score
    columns, higher = more degraded):

    - ``"blur"``: Gaussian-like blur wider than about 1.5 px (:func:`~rankmoe.conditioning.measures.edge_blur`);
    - ``"noise"``: additive noise (:func:`~rankmoe.conditioning.measures.noise_level`);
    - ``"jpeg"``: JPEG 8x8 blocking (:func:`~rankmoe.conditioning.measures.blockiness`);
    - ``"resolution"``: missing fine detail (periods of 2-7 px), as after down-and-up scaling, not explained by
      heavy blur (:func:`~rankmoe.conditioning.measures.resolution_loss`). Blur narrower than about 1.5 px removes
      the same detail and reads as resolution loss; a single image cannot tell the two apart.

    Each raw measure goes through a fixed logistic :class:`Calibration` (:data:`DEFAULT_CALIBRATION`, where the
    constants come from). Images must be at least ``128 x 128`` (:data:`~rankmoe.conditioning.measures.MIN_SIZE`);
    any larger size works, the measures are per pixel. The module has no parameters and no buffers; it runs on
    the images' device (CPU or GPU) in float32 and returns scores in the images' dtype.

    Args:
        dims: Which dimensions to score, in column order (default: ``("blur", "noise", "jpeg", "resolution")``).
        severity: How the per-image severity is formed from the ``D`` scores: ``"mean"`` (default), ``"max"``,
            ``D`` non-negative weights, or a callable ``(b, D) -> (b,)`` (see
            :func:`~rankmoe.conditioning.base.aggregate_severity`).
        calibration: Replacement :class:`Calibration` per dimension name (the others keep their default).

    Raises:
        ValueError: For unknown, repeated or no dimensions, calibrations for unknown dimensions, or an invalid
            severity rule.
        TypeError: If a calibration is not a :class:`Calibration`.

    Example:
        >>> estimator = WeightFreeDegradationEstimator()
        >>> scores = estimator(torch.rand(2, 3, 128, 128))   # white noise: very noisy, no JPEG blocking
        >>> scores.names
        ('blur', 'noise', 'jpeg', 'resolution')
        >>> tuple(scores.scores.shape), tuple(scores.severity.shape)
        ((2, 4), (2,))
        >>> bool((scores.scores[:, 1] > 0.99).all()), bool((scores.scores[:, 2] < 0.1).all())
        (True, True)
    """

    DIMENSIONS: tuple[str, ...] = ("blur", "noise", "jpeg", "resolution")
    """Every dimension this estimator can score, in the default column order."""

    def __init__(
        self,
        dims: Sequence[str] | None = None,
        *,
        severity: SeverityRule = "mean",
        calibration: Mapping[str, Calibration] | None = None,
    ) -> None:
        super().__init__(severity)
        names = self.DIMENSIONS if dims is None else tuple(dims)
        unknown = [name for name in names if name not in self.DIMENSIONS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(
                f"dims must be distinct names from {list(self.DIMENSIONS)}, got {list(names)}"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        self.names = names
        check_severity_rule(severity, len(names))
        overrides = dict(calibration or {})
        unknown = [name for name in overrides if name not in names]
        if unknown:
            raise ValueError(f"calibration given for {unknown}, which are not among the scored dims {list(names)}")
        for name, value in overrides.items():
            if not isinstance(value, Calibration):
                raise TypeError(
                    f"calibration[{name!r}] must be a rankmoe Calibration(midpoint, scale, log), got "
                    f"{type(value).__name__}"
                )
        self.calibration: dict[str, Calibration] = {
            name: overrides.get(name, DEFAULT_CALIBRATION[name]) for name in names
        }

    def measure(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The raw (uncalibrated) measure of every scored dimension.

        Args:
            images: ``(b, 3, h, w)`` floating RGB in ``[0, 1]``, ``h, w >= 128``.

        Returns:
            ``{name: (b,)}`` in float32 on the images' device, in the units of :mod:`rankmoe.conditioning.measures`
            (``blur`` px, ``noise`` 8-bit levels, ``jpeg`` log ratio, ``resolution`` nats).

        Raises:
            TypeError / ValueError: For images that are not floating RGB batches in ``[0, 1]`` or are smaller than
                ``128 x 128``.
        """
        with torch.no_grad():
            return raw_measures(images, self.names)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, D)`` calibrated scores of validated images ``(b, 3, h, w)`` in ``[0, 1]``, float32.

        Raises:
            ValueError: For images smaller than ``128 x 128``.
        """
        raw = raw_measures(images, self.names)
        return torch.stack([self.calibration[name](raw[name]) for name in self.names], dim=-1)

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, severity={self.severity_rule!r}"
