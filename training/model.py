"""The whole KoVAE forecaster in one file: encoder, stable Koopman operator, decoder, losses.

KoVAE (Naiman et al., ICLR 2024) adapted to forecasting with control inputs:

    q(z_t | x_<=t, u_<=t)   causal GRU encoder, a Gaussian per step
    z[t+1] = A z[t] + B u[t+1] + c + s * eps     linear latent dynamics (the prior), A stable by construction
    x[t]   = D(z[t], u_c[t]) pointwise MLP decoder, so all dynamics live in A and B

u_c[t] are the controls of the same step (``model.decoder_controls``; none: D(z[t]) alone), the state-space
model's feedthrough y = g(z, u): dissolved oxygen and the anoxic nitrate settle within minutes of a change in
KLa or the internal recycle, so at 15-minute samples they are a static, nonlinear function of the control and
the slowly moving load (oxygen transfer is KLa (S_sat - S_O)), which the decoder can represent and a latent state
linear in u can only approximate. The dynamics stay in A and B. Only those fast variables (the catalog's
``fast``, each loop's measurement and looped control) read u_c (``model.decoder_fast_only``); the rest are D(z, 0):
under a DO loop more air comes with more ammonium, and a decoder reading KLa for effluent ammonium learned that
correlation as an instant response of the wrong sign.
A control a feedback loop drives (KLa_5 under the DO loop) is an output too: what the loop will apply. With
``model.loop_feedback``, where a request leaves it to its loop, each step is driven by the model's own forecast of
it (decoded from the state the step starts from and the step's setpoint), clipped to the loop's output limits, and
the setpoint reaches the plant only through that control: a higher DO setpoint adds no air, and so takes no
ammonium, once the blower runs at its limit. The dynamics stay linear in z and u; the loop closes around them, and
the clip bounds what it feeds back, so z stays bounded under a stable A.
The first ``model.exogenous_modes`` latent coordinates take no input from the plan (their rows of B are 0 in the
plan's columns) and alone decode the exogenous outputs, the influent, through a head of their own: no plan can
move the influent forecast, by construction, where the what-if pairs otherwise had to teach it.

A forecast from the last history step t also carries the decoder's miss at t, fading per variable:
x[t+k] = D(z[t+k], u_c[t+k]) + g^k (x[t] - D(z[t], u_c[t])), with each g = sigmoid(a) in (0, 1) learned with
everything else (and chosen again per variable on validation, training.calibrate), so the forecast starts from the
measured state.
Slow variables (sludge mass, temperature) keep their measured level instead of the decoder's approximation of
it; noisy ones (influent) drop the miss quickly. The miss is a constant times g^k, not fed back, so it can never
grow.

Then each step is blended, per variable and lead time, with the two naive forecasts the product is judged
against: x[t+k] <- x[t+k] + s[k, v] (x[t+k-P] - x[t+k]) (the same time one day earlier, P samples per day,
``model.seasonal_steps``), then + q[k, v] (x[t] - x[t+k]) (the last measured value), s and q = sigmoid(.) in
(0, 1) learned. Where the plant repeats its day (the influent's daily cycle) the forecast leans on yesterday;
where a variable moves in ways the latent state does not explain (the blanket's jumps), on its last value. Both
read the history only, so stability is untouched. A control its loop decides is answered with one more pull
towards its last value (``loop_shift``, set by calibration), for the answer only: the rollout stays driven by the
loop's own forecast.

The training objective is the multi-step forecast error of exactly that forecast, each horizon step weighted by
the inverse of persistence's error there (to a power, ``train.step_weight_power``): without it the first steps,
where the naive forecast is hardest to beat, hardly count next to the 24-h errors.

Missing values (NaN) in the history are allowed: the encoder sees each input set to 0 (its training mean) next
to a mask that says it is missing, the fading and day-earlier misses skip what was not measured, and every loss
counts only what was measured.

u[t] is the mean control over the interval that ends at sample t, so u[t+1] drives the step t -> t+1.
Everything here works in normalised units; the scalers live in the model card.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.config import ModelConfig, TrainConfig

STEPS_PER_DAY = 96  # at 15-minute samples, the only ones a catalog may have (plant.catalog.TRAINED_SAMPLE_MINUTES)


BAND_MARGIN = 0.1  # in training stds: no closer to a physical bound than this is a value read in band space


def band_space(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, margin: float | torch.Tensor = BAND_MARGIN):
    """The logit of each value's place in its physical range [lo, hi] (per variable, in v's units): where
    forecast samples are widened, so that no band leaves the range. Near a bound it is a log (a concentration
    near 0 spreads by factors), mid-range nearly linear. Values are read no closer to a bound than ``margin``
    (in v's units; normalised: a tenth of the training std): a forecast at the bound would otherwise turn a
    sample's small step off it into a leap across the range."""
    frac = ((v - lo) / (hi - lo)).clamp(margin / (hi - lo), 1 - margin / (hi - lo))
    return torch.log(frac) - torch.log1p(-frac)


def from_band_space(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * torch.sigmoid(y)


def calibrated_samples(
    mean: torch.Tensor,
    raw: torch.Tensor,
    width: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    saturated: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Widen each sample's deviation from the mean forecast by the factor ``IntervalWidth`` gives its window, in
    ``band_space`` where the variables' physical ``bounds`` (lo, hi per variable, in the forecast's units) are
    given (cards from before them: linearly).

    ``saturated`` (lo, hi per variable; -inf / inf where none, ``KoVAE.saturation``): a sample at or past them
    is kept as drawn. A loop whose sample ran its blower at the limit runs it there however the width scales the
    disturbance around it; scaled towards the mean, the band of a saturated loop stopped short of the limit it
    sat on.

    mean (batch, H, x), raw samples (batch, S, H, x), width (batch or 1, x). Used by evaluation and the ONNX graph
    alike.
    """
    factor = width[:, None, None, :]
    if bounds is None:
        out = mean.unsqueeze(1) + factor * (raw - mean.unsqueeze(1))
    else:
        # In float64: the logit's ends magnify float32 rounding, and the graph must match PyTorch to 1e-4.
        lo, hi, f = bounds[0].double(), bounds[1].double(), factor.double()
        centre = band_space(mean.unsqueeze(1).double(), lo, hi)
        out = from_band_space(centre + f * (band_space(raw.double(), lo, hi) - centre), lo, hi).to(mean.dtype)
    if saturated is None:
        return out
    return torch.where(at_limits(raw, *saturated), raw, out)


def at_limits(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Where ``values`` sit at or past a loop's output limits (``KoVAE.saturation``): the samples the graph keeps
    as drawn (``calibrated_samples``), and so the width's fit (``training.forecast.saturating_parts``)."""
    return (values <= lo) | (values >= hi)


DRIVER_CLIP = (-2.0, 3.0)  # z-scores of the width's driver beyond these widen (or narrow) no further
MOTION_TOL = 0.05  # normalised units: a plan column whose history spans less than this stood still


def plan_moved(u_hist: torch.Tensor, columns: list[int], steps: int) -> torch.Tensor:
    """(B,) 1 where any of the plan's ``columns`` of u moved (its lowest and highest value more than MOTION_TOL
    apart) over the last ``steps`` of the history (B, L, n_u), else 0; a column never measured did not move."""
    v = u_hist[:, -steps:, columns]
    seen = ~torch.isnan(v)
    top = torch.where(seen, v, torch.full_like(v, -1e9)).amax(1)
    bottom = torch.where(seen, v, torch.full_like(v, 1e9)).amin(1)
    return (seen.any(1) & (top - bottom > MOTION_TOL)).any(-1).to(u_hist.dtype)


def driver_level(x_hist: torch.Tensor, driver: int) -> torch.Tensor:
    """(B,) the highest measured value of variable ``driver`` over each history (B, L, x), clipped to DRIVER_CLIP;
    0 where it was never measured. What ``IntervalWidth`` widens with, and what calibration fits it on."""
    level = x_hist[:, :, driver]
    seen = ~torch.isnan(level)
    top = torch.where(seen, level, torch.full_like(level, -1e9)).amax(1)
    return torch.where(seen.any(1), top, torch.zeros_like(top)).clamp(*DRIVER_CLIP)


class IntervalWidth(nn.Module):
    """Per window and variable, the factor on the forecast samples' deviations from the mean, fitted on validation
    (training.interval_width, the card's calibration):

        spread[v] * exp(gamma * clip(z_max(driver))) * ratio_k[v] ** share_k   (for each optional input kind k)

    with share_k the share of kind k's future flags that are set (or, for a kind fitted on its absence, not set).

    with z_max the highest measured z-score of the driver over the history. The prior noise gives the samples'
    shape, not a width to trust: one factor per variable alone covered the later period 89% and storms 77% of
    the time. The driver (the influent flow on BSM1) widens the interval on a wet day, when more storms follow,
    and each optional input the caller sends (the loops' setpoints, an influent forecast) scales it by its ratio,
    to the share of its future flags that are set. Then a ratio per variable for a plan that moved over the
    history's last day (``plan_moved``: setpoints an operator, a schedule or a cascade moves, controls stepped
    open loop) and one for a plan that stood still: one width covered plants whose setpoints move 70-75% of the
    time and blowers at a fixed output 85%. A calibration without these keys gives the per-variable factor alone.
    """

    def __init__(self, x_dim: int, calib: dict) -> None:
        super().__init__()
        width = calib.get("width", {})
        self.register_buffer("spread", torch.tensor(calib.get("spread_scale", [1.0] * x_dim), dtype=torch.float32))
        self.driver: int | None = width.get("driver")
        self.gamma = float(width.get("gamma", 0.0))
        # The outputs' physical bounds in normalised units, where the samples are widened (band_space); none for
        # cards from before them.
        self.bounds: tuple[torch.Tensor, torch.Tensor] | None = None
        if "band_bounds" in calib:
            lo, hi = (torch.tensor(calib["band_bounds"][k], dtype=torch.float32) for k in ("lo", "hi"))
            self.register_buffer("lo", lo)
            self.register_buffer("hi", hi)
            self.bounds = (self.lo, self.hi)
        self.known_columns = [list(k["columns"]) for k in width.get("known", [])]
        # Each kind's ratio applies to the share of its flags set ("known") or not set ("unknown").
        self.unknown = [k.get("when", "known") == "unknown" for k in width.get("known", [])]
        for i, k in enumerate(width.get("known", [])):
            self.register_buffer(f"log_ratio_{i}", torch.tensor(np.log(k["ratio"]), dtype=torch.float32))
        motion = width.get("motion")  # none: cards from before it
        self.motion_columns: list[int] = list(motion["columns"]) if motion else []
        self.motion_steps = int(motion["steps"]) if motion else 0
        if motion:
            for key in ("moved", "still"):
                self.register_buffer(f"log_{key}", torch.tensor(np.log(motion[key]), dtype=torch.float32))

    def forward(self, x_hist: torch.Tensor, u_fut: torch.Tensor, u_hist: torch.Tensor) -> torch.Tensor:
        """x_hist (B, L, x), u_fut (B', h, n_u) and u_hist (B, L, n_u) as the model reads them (B = 1 with B'
        plans) -> (max(B, B'), x)."""
        log_width = torch.zeros_like(u_fut[:, 0, :1]) + torch.zeros_like(x_hist[:, 0, :1])  # (B or B', 1)
        if self.driver is not None and self.gamma != 0.0:
            log_width = log_width + self.gamma * driver_level(x_hist, self.driver)[:, None]
        for i, columns in enumerate(self.known_columns):
            share = u_fut[:, :, columns].mean((1, 2))[:, None]  # (B', 1): the share of the flags that are set
            share = 1 - share if self.unknown[i] else share
            log_width = log_width + share * getattr(self, f"log_ratio_{i}")
        if self.motion_columns:
            moved = plan_moved(u_hist, self.motion_columns, self.motion_steps)[:, None]  # (B, 1)
            log_width = log_width + moved * self.log_moved + (1 - moved) * self.log_still
        return self.spread * torch.exp(log_width)


def last_seen_step(x_hist: torch.Tensor) -> torch.Tensor:
    """(batch, 1, x): the history index of each variable's last measured step (0 where it never was)."""
    seen = ~torch.isnan(x_hist)
    steps = torch.arange(1, x_hist.shape[1] + 1, dtype=x_hist.dtype)[:, None]
    return (seen.to(x_hist.dtype) * steps).argmax(1, keepdim=True)


def steps_since_seen(x_hist: torch.Tensor) -> torch.Tensor:
    """(batch, 1, x): how many steps before the history's end each variable was last measured (0: at its last
    step; never: as old as the history, L - 1)."""
    return x_hist.shape[1] - 1 - last_seen_step(x_hist)


def last_measured(x_hist: torch.Tensor) -> torch.Tensor:
    """(batch, x): each variable's last value in the history that is not missing (NaN where none is)."""
    value = torch.gather(x_hist, 1, last_seen_step(x_hist)).squeeze(1)
    return torch.where((~torch.isnan(x_hist)).any(1), value, torch.full_like(value, float("nan")))


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the target values that were measured (NaN: missing, left out)."""
    seen = torch.isfinite(target)
    return (torch.where(seen, pred - torch.nan_to_num(target), 0.0) ** 2).sum() / seen.sum().clamp(min=1)


class StableKoopman(nn.Module):
    """z[t+1] = A z[t] + B u + c, with A in real modal form: every |eigenvalue| <= rho_max for any parameters.

    A is block diagonal: 2x2 blocks r [[cos t, -sin t], [sin t, cos t]] with r = rho_max * sigmoid(a), then
    real modes rho_max * tanh(b). Learned latent coordinates make this almost as general as a dense A (any
    diagonalisable matrix is similar to this form), A is normal so ||A^k|| = rho^k (no transient growth), and
    the eigenvalues are the parameters, so they are known without an eig call.
    """

    def __init__(
        self,
        z_dim: int,
        u_dim: int,
        real_modes: int,
        rho_max: float,
        exogenous: int = 0,
        plan_columns: int = 0,
        silent: tuple[int, ...] = (),
    ) -> None:
        """``exogenous``: the first this many latent coordinates take no input from the first ``plan_columns``
        columns of u (the plan): their rows of B are held at 0 there (``input_matrix``). ``silent``: columns of u
        that drive no latent coordinate (a loop's setpoint under model.loop_feedback acts through its control)."""
        super().__init__()
        self.z_dim, self.rho_max = z_dim, rho_max
        n_pairs = (z_dim - real_modes) // 2
        # Radii from 0.9 to 0.995 (time constants of 2.4 h to 2 days), some angles on the daily cycle's harmonics.
        radii = torch.linspace(0.9, 0.995, n_pairs)
        angles = torch.rand(n_pairs) * math.pi / 4
        n_daily = min(n_pairs, 8)
        angles[:n_daily] = 2 * math.pi * torch.arange(1, n_daily + 1) / STEPS_PER_DAY
        radii[:n_daily] = 0.995
        self.pair_logit = nn.Parameter(torch.logit(radii / rho_max))
        self.pair_angle = nn.Parameter(angles)
        self.real_atanh = nn.Parameter(torch.atanh(torch.linspace(0.5, 0.99, real_modes) / rho_max))
        self.B = nn.Parameter(torch.randn(z_dim, u_dim) * 0.05)
        self.c = nn.Parameter(torch.zeros(z_dim))
        self.log_noise = nn.Parameter(torch.full((z_dim,), -1.0))  # prior transition noise scale (log)
        mask = None
        if (exogenous and plan_columns) or silent:
            mask = torch.ones(z_dim, u_dim)
            mask[:exogenous, :plan_columns] = 0.0
            mask[:, list(silent)] = 0.0
        self.input_mask: torch.Tensor | None
        self.register_buffer("input_mask", mask, persistent=False)

    def input_matrix(self) -> torch.Tensor:
        """B as the dynamics use it: zero where the plan would drive an exogenous latent coordinate, and in the
        silent columns."""
        return self.B if self.input_mask is None else self.B * self.input_mask

    def pair_radii(self) -> torch.Tensor:
        return self.rho_max * torch.sigmoid(self.pair_logit)

    def real_poles(self) -> torch.Tensor:
        return self.rho_max * torch.tanh(self.real_atanh)

    def matrix(self) -> torch.Tensor:
        r, t = self.pair_radii(), self.pair_angle
        cos, sin = r * torch.cos(t), r * torch.sin(t)
        blocks = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
        return torch.block_diag(*blocks, torch.diag(self.real_poles()))

    def eigenvalues(self) -> np.ndarray:
        """Analytic eigenvalues (complex128): r e^{+-it} for each block, then the real poles."""
        with torch.no_grad():
            r = self.pair_radii().double().numpy()
            t = self.pair_angle.double().numpy()
            poles = self.real_poles().double().numpy()
        pairs = np.stack([r * np.exp(1j * t), r * np.exp(-1j * t)], 1).reshape(-1)
        return np.concatenate([pairs, poles.astype(np.complex128)])

    def moduli(self) -> torch.Tensor:
        """|eigenvalue| as a differentiable tensor (each pair's radius counted twice)."""
        r = self.pair_radii()
        return torch.cat([r, r, self.real_poles().abs()])


@dataclass(frozen=True)
class PlanLayout:
    """Where the plan sits in the known inputs u (``modelcard.card.known_inputs``): the scaled controls, then one
    flag per looped control (1: its future was given, 0: its loop decides it), then the setpoints' values and
    their flags. These leading columns are what the decoder reads beside z; calendar and disturbance columns
    follow them."""

    controls: int = 0
    looped: tuple[int, ...] = ()  # positions among the controls of those a feedback loop drives
    setpoints: int = 0
    # Output positions that settle within a sample of a control move (modelcard.card.fast_outputs): with
    # model.decoder_fast_only, the only ones the decoder reads the plan for. None: every output.
    fast: tuple[int, ...] | None = None
    # Output positions no plan can move (modelcard.card.exogenous_outputs: the influent), decoded from the
    # exogenous latent coordinates alone (model.exogenous_modes).
    exogenous: tuple[int, ...] = ()
    # Each looped control's controller output limits in its normalised units (modelcard.card.loop_limits), what
    # model.loop_feedback clips the control's forecast to.
    limits: tuple[tuple[float, float], ...] = ()

    @property
    def fed(self) -> int:
        return self.controls + len(self.looped) + 2 * self.setpoints

    @property
    def values(self) -> list[int]:
        """The u columns of the plan's values: the controls, then the setpoints (not their flags)."""
        nc, nl = self.controls, len(self.looped)
        return [*range(nc), *range(nc + nl, nc + nl + self.setpoints)]


def scaled_limits(
    limits: list[tuple[float, float]], looped: tuple[int, ...], u_mean: np.ndarray, u_std: np.ndarray
) -> tuple[tuple[float, float], ...]:
    """Each loop's output limits (engineering units, modelcard.card.loop_limits) in its control's normalised
    units (``looped``: the controls' positions), for PlanLayout.limits. A looped control's forecast (x's column)
    is scaled like the control itself, so one clip serves both."""
    return tuple(
        (float((lo - u_mean[j]) / u_std[j]), float((hi - u_mean[j]) / u_std[j]))
        for (lo, hi), j in zip(limits, looped, strict=True)
    )


def plan_known(u: torch.Tensor, plan: PlanLayout) -> torch.Tensor:
    """(..., n_controls + n_setpoints): 1 where each of the plan's value columns (the controls, then the
    setpoints) is known in u, 0 where not: a control no loop drives is always known, the others have flags."""
    nc, nl, ns = plan.controls, len(plan.looped), plan.setpoints
    given = torch.cat([torch.ones_like(u[..., :1]), u[..., nc : nc + nl]], -1)  # column 0: a control no loop drives
    pick = [1 + plan.looped.index(j) if j in plan.looped else 0 for j in range(nc)]
    return torch.cat([given[..., pick], u[..., nc + nl + ns : nc + nl + 2 * ns]], -1)


def held_plan(u_hist: torch.Tensor, u_fut: torch.Tensor, plan: PlanLayout) -> torch.Tensor:
    """u_fut with the plan held: every given control and setpoint at its last known value in the history (its
    first planned value where the history has none), each looped control and setpoint given or not as in u_fut.

    The naive blends read this forecast, not the plan's: yesterday and the last value know nothing of a plan,
    so what they add must not depend on it (blending the plan's own forecast shrank every what-if by the blend).
    u_hist (B, L, n_u) may have one row for many plans (B = 1)."""
    if plan.fed == 0:
        return u_fut
    nc, nl, ns = plan.controls, len(plan.looped), plan.setpoints
    values = plan.values
    hist = u_hist[..., values]
    last = last_measured(torch.where(plan_known(u_hist, plan) > 0.5, hist, torch.full_like(hist, float("nan"))))
    last = torch.where(torch.isnan(last), u_fut[:, 0, values], last).unsqueeze(1)  # (B or B', 1, n_values)
    held = last * plan_known(u_fut, plan)
    return torch.cat([held[..., :nc], u_fut[..., nc : nc + nl], held[..., nc:], u_fut[..., nc + nl + ns :]], -1)


def _same(t: torch.Tensor) -> torch.Tensor:
    """Each history's rows are its plan's (``KoVAE.served``'s default spread)."""
    return t


def _twice(t: torch.Tensor) -> torch.Tensor:
    """Each history's rows for two plans, one after the other (``KoVAE.plan_effect``)."""
    return torch.cat([t, t])


class SequenceDropout(nn.Module):
    """Dropout whose mask a sequence keeps at every step: a (batch, steps, ..., features) tensor drops the same
    features of a sequence throughout (variational dropout, Gal and Ghahramani 2016), a (rows, features) one per
    row. The noise a rollout sees is then one perturbed network rather than a new one every 15 minutes, and the
    mask is a thousand times fewer random numbers: drawing an element-wise mask (``nn.Dropout``) was a quarter of
    a training batch on the CPU. Off in eval mode, like nn.Dropout; no parameters, so older weights load."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = (x.shape[0], *[1] * (x.dim() - 2), x.shape[-1])
        keep = torch.rand(shape, dtype=x.dtype, device=x.device) >= self.p
        return x * (keep.to(x.dtype) / (1.0 - self.p))  # the scale on the small mask: one pass over x


def dropout(cfg: ModelConfig) -> nn.Module:
    """The dropout model.dropout_per_sequence picks (cards written before it: nn.Dropout, element-wise)."""
    return SequenceDropout(cfg.dropout) if cfg.dropout_per_sequence else nn.Dropout(cfg.dropout)


class KoVAE(nn.Module):
    def __init__(self, x_dim: int, u_dim: int, cfg: ModelConfig, plan: PlanLayout | None = None) -> None:
        """``plan``: where the plan (controls, looped controls' flags, setpoints) leads the u columns (the rest:
        calendar and disturbance columns); with ``cfg.decoder_controls`` they feed the decoder too."""
        super().__init__()
        self.cfg = cfg
        self.x_dim, self.u_dim = x_dim, u_dim
        self.plan = plan or PlanLayout()
        self.n_fed = self.plan.fed if cfg.decoder_controls else 0  # u columns the decoder reads
        self.encoder = nn.GRU(2 * (x_dim + u_dim), cfg.h_dim, batch_first=True)  # values and missingness masks
        self.enc_norm = nn.LayerNorm(cfg.h_dim) if cfg.layer_norm else nn.Identity()
        self.enc_head = nn.Sequential(dropout(cfg), nn.Linear(cfg.h_dim, 2 * cfg.z_dim))
        # With model.exogenous_modes, the leading latent coordinates are the plan's no business: B holds no plan
        # column there, and the exogenous outputs (the influent) are decoded from them alone (``exo_head``), so a
        # what-if never moves the influent and nothing has to learn that it must not.
        n_exo = cfg.exogenous_modes if self.plan.exogenous else 0
        if n_exo > cfg.z_dim - cfg.real_modes:
            raise ValueError(f"model.exogenous_modes {n_exo} exceeds the {cfg.z_dim - cfg.real_modes} paired modes")
        # model.loop_feedback: a control left to its loop drives z with the model's forecast of it (loop_inputs),
        # and its setpoint (value and flag columns) drives z only through it.
        plan = self.plan
        self.feedback = bool(cfg.loop_feedback and plan.looped)
        nc, nl, ns = plan.controls, len(plan.looped), plan.setpoints
        silent = tuple(range(nc + nl, nc + nl + 2 * ns)) if self.feedback else ()
        self.koopman = StableKoopman(cfg.z_dim, u_dim, cfg.real_modes, cfg.rho_max, n_exo, plan.fed, silent)
        # No LayerNorm in the decoder: it would make x blind to the scale of z, so latents could drift in
        # scale freely (inflating the KL) and forecast samples could not spread beyond a fixed width.
        layers: list[nn.Module] = []
        width, hidden = cfg.z_dim + self.n_fed, cfg.decoder_dim or cfg.h_dim
        for _ in range(cfg.decoder_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU(), dropout(cfg)]
            width = hidden
        layers.append(nn.Linear(width, x_dim))
        self.decoder = nn.Sequential(*layers)
        # A linear path from the plan to x beside the MLP: a loop holds its measurement at its setpoint (the DO at
        # 2.0 to a few hundredths), a relation the MLP's SiLU layer only approximates.
        self.skip = nn.Linear(self.n_fed, x_dim, bias=False) if cfg.decoder_skip and self.n_fed else None
        # Outputs decoded with the plan (the fast ones); the others are decoded with the plan at its training mean
        # (0), from z alone: a control reaches them through A and B only. Not in the state dict (cards before it).
        mask = None
        if self.n_fed and cfg.decoder_fast_only and self.plan.fast is not None:
            mask = torch.zeros(x_dim, dtype=torch.bool)
            mask[list(self.plan.fast)] = True
        self.fast_mask: torch.Tensor | None
        self.register_buffer("fast_mask", mask, persistent=False)
        self.n_exo = n_exo
        self.exo_head: nn.Module | None = None
        self.exo_mask: torch.Tensor | None
        self.exo_place: torch.Tensor | None
        exo_mask = exo_place = None
        if n_exo:
            outputs = list(self.plan.exogenous)
            hidden = cfg.decoder_dim or cfg.h_dim
            self.exo_head = nn.Sequential(
                nn.Linear(n_exo, hidden), nn.SiLU(), dropout(cfg), nn.Linear(hidden, len(outputs))
            )
            exo_mask = torch.zeros(x_dim, dtype=torch.bool)
            exo_mask[outputs] = True
            exo_place = torch.zeros(len(outputs), x_dim)  # one-hot rows: the head's outputs into x's columns
            exo_place[range(len(outputs)), outputs] = 1.0
        self.register_buffer("exo_mask", exo_mask, persistent=False)
        self.register_buffer("exo_place", exo_place, persistent=False)
        self.loop_lo: torch.Tensor | None
        self.loop_hi: torch.Tensor | None
        self.loop_place: torch.Tensor | None
        lo = hi = place = None
        if self.feedback:
            if len(plan.limits) != nl:
                raise ValueError(f"model.loop_feedback needs the output limits of all {nl} loops (PlanLayout.limits)")
            if not cfg.decoder_controls or (mask is not None and not mask[x_dim - nl :].all()):
                raise ValueError("model.loop_feedback needs the looped controls decoded with the plan")
            lo, hi = (torch.tensor([lim[i] for lim in plan.limits], dtype=torch.float32) for i in (0, 1))
            place = torch.zeros(nl, u_dim)  # one-hot rows: each loop's forecast into its control's column of u
            place[range(nl), list(plan.looped)] = 1.0
        self.register_buffer("loop_lo", lo, persistent=False)
        self.register_buffer("loop_hi", hi, persistent=False)
        self.register_buffer("loop_place", place, persistent=False)
        # Fading of the decoder's miss at the last history step, per variable: g = sigmoid(a) in (0, 1).
        self.decay_logit = nn.Parameter(torch.full((x_dim,), 2.0))
        # Blends towards the same time a day earlier and towards the last value, per lead time and variable.
        self.seasonal_logit = nn.Parameter(torch.full((max(cfg.seasonal_steps, 1), x_dim), -3.0))
        self.persistence_logit = nn.Parameter(torch.full((STEPS_PER_DAY, x_dim), -3.0))
        # A down sensor's pull towards its last value, per lead time from that value and variable: not learned, set
        # from the card's calibration.gap_pull (training.gaps.fit_gap_pull; none: no such term).
        self.gap_pull: torch.Tensor | None
        self.register_buffer("gap_pull", None, persistent=False)
        # The answer's pull of each looped control's forecast towards its last value, per lead time and loop: not
        # learned, set from the card's calibration.loop_pull (training.calibrate.fit_loop_pull; none: no such term).
        self.loop_pull: torch.Tensor | None
        self.register_buffer("loop_pull", None, persistent=False)

    def decode(
        self, z: torch.Tensor, u: torch.Tensor, *, complete: bool = False, hz: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x = D(z, u_c), pointwise: z (..., z_dim) and u (..., u_dim) of the same steps; u_c its first n_fed
        columns (the controls), a missing one (NaN, a history gap) read as 0, its training mean. ``complete``:
        the caller knows u has no NaN (planned controls), so no mask is built (the plans graph decodes per step).
        ``hz``: z's share of the decoder's first layer (``first_layer``), if the caller has it. The exogenous
        outputs, if the model has them, come from the exogenous coordinates alone."""
        out = self._decode_plant(z, u, complete, hz)
        if self.exo_head is None or self.exo_mask is None or self.exo_place is None:
            return out
        return torch.where(self.exo_mask, self.exo_head(z[..., : self.n_exo]) @ self.exo_place, out)

    def first_layer(self, z: torch.Tensor) -> torch.Tensor:
        """z's share of the decoder's first layer, W_z z + b (..., hidden): most of the decoder's work per step,
        and the same for a state's decoding and for the loops' forecast of the next step's control
        (``decode_looped``), so a rollout under loop feedback computes it once per state."""
        first = self.decoder[0]
        return F.linear(z, first.weight[:, : z.shape[-1]], first.bias)

    def _decode_plant(
        self, z: torch.Tensor, u: torch.Tensor, complete: bool, hz: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.n_fed:
            return self.decoder(z)
        controls = u[..., : self.n_fed]
        if not complete:
            controls = torch.where(torch.isnan(controls), 0.0, controls)
        # The outputs decode [z, u_c]; with a fast mask, the slow ones [z, 0]. Both share the first layer's product
        # with z, computed once (it is most of the decoder's work per step, which each control plan pays).
        first, rest = self.decoder[0], self.decoder[1:]
        shared = self.first_layer(z) if hz is None else hz
        out = rest(shared + F.linear(controls, first.weight[:, z.shape[-1] :]))
        out = out if self.skip is None else out + self.skip(controls)
        return out if self.fast_mask is None else torch.where(self.fast_mask, out, rest(shared))

    def residual_decay(self) -> torch.Tensor:
        """g per variable, (x,): every value in (0, 1) for any parameter value."""
        return torch.sigmoid(self.decay_logit)

    def encode(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step posterior mean and log-variance, (batch, time, z) each; step t sees only steps <= t.
        NaN in x or u means missing: the encoder gets 0 there and a mask of 1."""
        mx, mu = torch.isnan(x), torch.isnan(u)
        inputs = [torch.where(mx, 0.0, x), mx.to(x.dtype), torch.where(mu, 0.0, u), mu.to(u.dtype)]
        h, _ = self.encoder(torch.cat(inputs, -1))
        mu, logvar = self.enc_head(self.enc_norm(h)).chunk(2, -1)
        return mu, logvar.clamp(-10.0, 5.0)

    def correction(
        self,
        x_hist: torch.Tensor,
        z_hist: torch.Tensor,
        u_hist: torch.Tensor,
        decay: torch.Tensor,
        horizon: int,
        decoded_hist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """g^(k + a) (x[s] - D(z[s], u[s])) for k = 1..horizon, (batch, horizon, x): the decoder's miss at each
        variable's last measured history step s, a steps before the last, fading with the per-variable factors
        g = ``decay`` (x,). z_hist (batch, L, z) are the history's latent states (``decoded_hist``: their decoding,
        if the caller has it). A sensor that went down two hours ago still hands its level on, faded by two
        hours; cards from before it (``model.correction_last_seen`` false) carry the last step's miss only."""
        steps = torch.arange(1, horizon + 1, dtype=x_hist.dtype)[:, None]
        if not self.cfg.correction_last_seen:
            miss = torch.nan_to_num(x_hist[:, -1] - self.decode(z_hist[:, -1], u_hist[:, -1]), nan=0.0)
            return miss.unsqueeze(1) * decay**steps
        L = x_hist.shape[1]
        seen = ~torch.isnan(x_hist)
        last = last_seen_step(x_hist)
        if decoded_hist is not None:
            decoded = torch.gather(decoded_hist, 1, last)  # (batch, 1, x)
        else:  # only the steps needed: variable v's row decoded at v's last step, its own output kept
            at = last.transpose(1, 2)  # (batch, x, 1)
            z = torch.gather(z_hist, 1, at.expand(-1, -1, z_hist.shape[-1]))  # (batch, x, z)
            u = torch.gather(u_hist, 1, at.expand(-1, -1, u_hist.shape[-1]))  # (batch, x, u)
            own = torch.eye(x_hist.shape[-1], dtype=x_hist.dtype)
            decoded = (self.decode(z, u) * own).sum(-1).unsqueeze(1)  # (batch, 1, x): the diagonal
        miss = torch.gather(x_hist, 1, last) - decoded  # (batch, 1, x)
        miss = torch.where(seen.any(1, keepdim=True), miss, torch.zeros_like(miss))  # never measured: nothing
        age = (L - 1 - last).to(x_hist.dtype)  # (batch, 1, x)
        return torch.nan_to_num(miss, nan=0.0) * decay ** (steps + age)

    def seasonal_weights(self, x_hist: torch.Tensor, horizon: int) -> torch.Tensor:
        """(batch, H, x) the weight s of the same time a day earlier at each lead time and variable.

        Adaptive (``model.seasonal_adaptive``): inverse-variance weighting, s = c / (c + m2), with c[k, v] =
        exp(seasonal_logit) the model's own error (learned) and m2 how far yesterday missed today over the last
        ``model.seasonal_check`` samples of the history (mean squared, normalised): where the plant repeats its
        day (BSM1's dry file), m2 is ~0 and the forecast takes yesterday; where it does not, little of it. A history
        without such pairs (shorter than a day and a sample) reads m2 = 1. Cards from before it: s = sigmoid(.)."""
        P, L = self.cfg.seasonal_steps, x_hist.shape[1]
        k = torch.arange(1, horizon + 1)
        idx = k + (L - 1 - P)  # history index of step t+k-P
        valid = ((idx >= 0) & (k <= P)).to(x_hist.dtype)[:, None]  # (H, 1)
        logit = self.per_lead(self.seasonal_logit, self.blend_leads(x_hist, horizon))  # (H, x) or (batch, H, x)
        if not self.cfg.seasonal_adaptive:
            weight = torch.sigmoid(logit) * valid
            return weight if weight.dim() == 3 else weight.unsqueeze(0)
        if P == 0:  # no day earlier (model.seasonal_steps = 0): no weight, and no slice [-J - 0 : -0] to take
            return torch.zeros(x_hist.shape[0], horizon, x_hist.shape[-1], dtype=x_hist.dtype)
        J = self.cfg.seasonal_check
        # Padded in front so that both slices exist for any history length (a constant pad exports cleanly).
        padded = torch.cat([torch.full_like(x_hist[:, :1], float("nan")).repeat(1, P + J, 1), x_hist], 1)
        miss = (padded[:, -J:] - padded[:, -J - P : -P]) ** 2
        seen = ~torch.isnan(miss)
        m2 = torch.where(seen, miss, 0.0).sum(1) / seen.sum(1).clamp(min=1)
        m2 = torch.where(seen.any(1), m2, torch.ones_like(m2))  # (B, x)
        c = logit.exp()
        # Floored: with the blends off (c = 0) a variable yesterday repeated exactly (m2 = 0) read 0/0, NaN.
        return c / (c + m2[:, None]).clamp_min(1e-30) * valid

    def blend_leads(self, x_hist: torch.Tensor, horizon: int) -> torch.Tensor:
        """The lead time whose blend weights each variable takes at each step: k, or (``model.blend_last_seen``)
        k + a for a variable last measured a steps before the history's end, (H, 1) or (batch, H, x)."""
        k = torch.arange(1, horizon + 1)[:, None]
        if not self.cfg.blend_last_seen:
            return k
        return k + steps_since_seen(x_hist)

    @staticmethod
    def per_lead(table: torch.Tensor, leads: torch.Tensor) -> torch.Tensor:
        """Rows of a (lead time, x) table at ``leads`` (``blend_leads``), each column at its own lead; past the
        table's last row, its last row."""
        rows = (leads - 1).clamp(max=table.shape[0] - 1)
        if rows.dim() == 2:
            return table[rows[:, 0]]  # (H, x)
        return table[rows, torch.arange(table.shape[1])]  # (batch, H, x)

    def seasonal(self, x_hist: torch.Tensor, forecast: torch.Tensor) -> torch.Tensor:
        """The forecast (batch, [samples,] H, x) blended with the two naive forecasts: + s[k] (x[t+k-P] - forecast)
        where that sample is in the history (not before it, k <= P, P > 0; s: ``seasonal_weights``; each weight of
        the lead time from the variable's last measurement, ``blend_leads``), then + q[k]
        (x_last - forecast) with x_last each variable's last measured value, and for a variable not measured at the
        history's last step + ``gap_pull`` (of the lead time from its last measurement) (x_last - forecast). A
        missing sample leaves the forecast as it is."""
        P, horizon, L = self.cfg.seasonal_steps, forecast.shape[-2], x_hist.shape[1]
        k = torch.arange(1, horizon + 1)
        samples = forecast.dim() == 4
        if P > 0:
            idx = k + (L - 1 - P)  # history index of step t+k-P
            weight = self.seasonal_weights(x_hist, horizon)  # (batch or 1, H, x)
            yesterday = x_hist[:, idx.clamp(0, L - 1)]
            yesterday, weight = (t.unsqueeze(1) if samples else t for t in (yesterday, weight))
            # Missing values are masked on the history's side, which may be one row for many plans (export).
            seen = ~torch.isnan(yesterday)
            forecast = forecast + weight * seen * (torch.where(seen, yesterday, 0.0) - forecast)
        last = last_measured(x_hist).unsqueeze(-2)  # (batch, 1, x)
        last = last.unsqueeze(1) if samples else last
        q = torch.sigmoid(self.per_lead(self.persistence_logit, self.blend_leads(x_hist, horizon)))
        q = q.unsqueeze(1) if samples and q.dim() == 3 else q
        seen = ~torch.isnan(last)
        last = torch.where(seen, last, 0.0)
        forecast = forecast + q * seen * (last - forecast)
        if self.gap_pull is None:
            return forecast
        # A variable whose last measurements are missing (a sensor down now) is pulled further towards its last
        # value, by the weight of the lead time counted from it: the blends above were fitted on whole histories.
        age = steps_since_seen(x_hist)  # (batch, 1, x)
        pull = self.per_lead(self.gap_pull, k[:, None] + age) * (age > 0)
        pull = pull.unsqueeze(1) if samples else pull
        return forecast + pull * seen * (last - forecast)

    def decode_looped(self, z: torch.Tensor, u: torch.Tensor, hz: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's outputs for the looped controls alone (x's last columns), (..., n_looped): what
        ``loop_inputs`` needs at every step, without the other outputs' share of the last layer (``hz``: z's share
        of the first layer, if the caller has it)."""
        nl, controls = len(self.plan.looped), u[..., : self.n_fed]
        first, last = self.decoder[0], self.decoder[-1]
        shared = self.first_layer(z) if hz is None else hz
        pre = shared + F.linear(controls, first.weight[:, z.shape[-1] :])
        if len(self.decoder) == 1:  # no hidden layer (model.decoder_layers 0): the first layer is the output
            out = pre[..., -nl:]
        else:
            out = F.linear(self.decoder[1:-1](pre), last.weight[-nl:], last.bias[-nl:])
        return out if self.skip is None else out + F.linear(controls, self.skip.weight[-nl:])

    def loop_inputs(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One step's known inputs u (N, n_u) with each control left to its loop (flag 0, its column 0) set to the
        model's forecast of it from the state z (N, z) the step starts from, clipped to the loop's output limits:
        the air a DO setpoint asks for, up to what the blower gives (model.loop_feedback). The clip bounds what
        the loop can feed back, so z stays bounded under a stable A whatever the decoder says. (A served forecast
        adds the naive blends' share first: ``rollout_with_held``.)"""
        nc, nl = self.plan.controls, len(self.plan.looped)
        assert self.loop_place is not None
        return u + ((1 - u[..., nc : nc + nl]) * self.within_limits(self.decode_looped(z, u))) @ self.loop_place

    def saturation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lo, hi) per output, (x,): the loops' output limits on the looped controls' columns, -inf / inf
        elsewhere (``calibrated_samples``); None without model.loop_feedback."""
        if not self.feedback:
            return None
        assert self.loop_lo is not None and self.loop_hi is not None
        nl = len(self.plan.looped)
        lo = torch.cat([self.loop_lo.new_full((self.x_dim - nl,), -torch.inf), self.loop_lo])
        hi = torch.cat([self.loop_hi.new_full((self.x_dim - nl,), torch.inf), self.loop_hi])
        return lo, hi

    def within_limits(self, need: torch.Tensor) -> torch.Tensor:
        """What the loops ask for (..., n_looped), clipped to their output limits (PlanLayout.limits)."""
        assert self.loop_lo is not None and self.loop_hi is not None
        return torch.minimum(torch.maximum(need, self.loop_lo), self.loop_hi)

    def rollout(
        self,
        z0: torch.Tensor,
        u_fut: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z[k] for k = 1..H under the future controls, and the inputs that drove each step (u_fut, with the
        controls left to their loops filled in under model.loop_feedback: ``loop_inputs``); optional
        standard-normal noise (batch, H, z). The latent forecast alone: a served one rolls out beside its plan
        held (``rollout_with_held``)."""
        A, B = self.koopman.matrix(), self.koopman.input_matrix()
        shock = None if noise is None else noise * self.koopman.log_noise.exp()
        z, out = z0, []
        if not self.feedback:
            drive = u_fut @ B.T + self.koopman.c  # (batch, H, z)
            drive = drive if shock is None else drive + shock
            for k in range(u_fut.shape[1]):
                z = z @ A.T + drive[:, k]
                out.append(z)
            return torch.stack(out, 1), u_fut
        used = []
        for k in range(u_fut.shape[1]):
            u = self.loop_inputs(z if shock is None else z + shock[:, k], u_fut[:, k])  # a sample: its step's shock too
            z = z @ A.T + u @ B.T + self.koopman.c
            z = z if shock is None else z + shock[:, k]
            out.append(z)
            used.append(u)
        return torch.stack(out, 1), torch.stack(used, 1)

    def decode_plan(
        self, z: torch.Tensor, u: torch.Tensor, *, complete: bool = False, hz: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A rollout's decoding from its states and the inputs that drove them (``rollout``): under
        model.loop_feedback each looped control's forecast is the value that drove the step (its loop's, clipped,
        or the one given), not a second reading of the decoder."""
        x = self.decode(z, u, complete=complete, hz=hz)
        if not self.feedback:
            return x
        return torch.cat([x[..., : self.x_dim - len(self.plan.looped)], u[..., list(self.plan.looped)]], -1)

    def rollout_with_held(
        self,
        z0: torch.Tensor,
        held: torch.Tensor,
        plans: torch.Tensor,
        spread: Callable[[torch.Tensor], torch.Tensor],
        base: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        operator: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        """The plan held (``held`` (b, H, n_u), one row per history, from z0 (b, z)) and the plans (``plans``
        (N, H, n_u); ``spread`` maps a per-history tensor (b, ...) onto the plans' rows (N, ...)) rolled out in one
        step loop. Per step, the held rows first: z (b + N, z), the inputs that drove the step (b + N, n_u) and,
        under model.loop_feedback, the state's share of the decoder's first layer (b + N, hidden; else None),
        which the next step's loops and a batched decoding reuse (lists, not stacked: the plans graph decodes step
        by step and recomputes it, since a stack of 1,000 plans' is 100 MB). ``noise`` (N, H, z), standard
        normal, drives the plans' rows.

        Under model.loop_feedback each step's loops ask for the decoder's forecast of their control from the state
        the step starts from. The plan held's loops drive the plant at their served forecast (the naive blends
        make ``scale`` times the decoder's value plus ``base`` of it, (b, H, n_looped) each: yesterday's air at
        this hour tells how near its limit the blower will run), and each plan's loops at their own decoded value
        plus the same step's difference between the held plan's served and decoded values: a plan that is the plan
        held rolls out exactly as it, and a plan's effect on the air is not shrunk by the blends. Each is clipped
        to the loop's output limits (``loop_inputs``). ``operator``: (A, B) frozen, as the exported graph holds
        them."""
        A, B = operator if operator is not None else (self.koopman.matrix(), self.koopman.input_matrix())
        nb = z0.shape[0]
        u = torch.cat([held, plans]).transpose(0, 1)  # (H, b + N, n_u)
        drive = u @ B.T + self.koopman.c
        jolts = None  # per step, each row's own disturbance over the step (0: the plan held, a mean forecast)
        if noise is not None:
            shock = (noise * self.koopman.log_noise.exp()).transpose(0, 1)
            drive = torch.cat([drive[:, :nb], drive[:, nb:] + shock], 1)
            jolts = torch.cat([torch.zeros_like(drive[:, :nb]), shock], 1).unbind(0)
        z, states = torch.cat([z0, spread(z0)]), []
        drives, inputs = drive.unbind(0), u.unbind(0)  # per step (an index per step would cost a full-size
        # gradient buffer per step in the backward pass; unbind's is one stack)
        if not self.feedback:
            for d in drives:
                z = z @ A.T + d
                states.append(z)
            return states, list(inputs), None
        assert self.loop_place is not None
        assert base is not None and scale is not None
        nc, nl = self.plan.controls, len(self.plan.looped)
        opens = (1 - u[..., nc : nc + nl]).unbind(0)  # per step (b + N, n_looped): 1 where the loop decides
        gains, bases = (scale - 1).unbind(1), base.unbind(1)
        to_z = self.loop_place @ B.T  # (n_looped, z): a looped control's column of B
        hz, fed_steps, firsts = self.first_layer(z), [], []
        w_z = self.decoder[0].weight[:, : z.shape[-1]]
        for k, d in enumerate(drives):
            # A sample's loop answers the disturbance of its own step: the need of the state plus the step's shock
            # (first_layer is affine, so its share is the shock's product alone). Decided from the state alone, every
            # sample ran the first step's control alike, and the loops' 15-min band had no width.
            need = self.decode_looped(z, inputs[k], hz if jolts is None else hz + F.linear(jolts[k], w_z))
            offset = gains[k] * need[:nb] + bases[k]  # the plan held's: served minus decoded
            fed = self.within_limits(need + torch.cat([offset, spread(offset)])) * opens[k]
            z = z @ A.T + d + fed @ to_z
            hz = self.first_layer(z)
            states.append(z)
            fed_steps.append(fed)
            firsts.append(hz)
        used = [v + fed @ self.loop_place for v, fed in zip(inputs, fed_steps, strict=True)]
        return states, used, firsts

    def plan_held(
        self,
        x_hist: torch.Tensor,
        u_hist: torch.Tensor,
        z_hist: torch.Tensor,
        u_fut: torch.Tensor,
        decay: torch.Tensor,
        decoded_hist: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What a served forecast needs before its rollout: the plan held (``held_plan``, (b, H, n_u)), the
        decoder's fading miss (``correction``, (b, H, x)) and, under model.loop_feedback, the naive blends' share
        of the loops' forecast: the served value of a decoded 0 (``base``) and what each decoded unit adds
        (``scale``), (b, H, n_looped) each (None without)."""
        corr = self.correction(x_hist, z_hist, u_hist, decay, u_fut.shape[1], decoded_hist)
        base = scale = None
        if self.feedback:
            looped = slice(self.x_dim - len(self.plan.looped), None)
            base = self.seasonal(x_hist, corr)[..., looped]
            scale = self.seasonal(x_hist, 1 + corr)[..., looped] - base
        held = held_plan(u_hist, u_fut, self.plan) if self.cfg.blend_held_plan else u_fut
        return held, corr, base, scale

    def served(
        self,
        x_hist: torch.Tensor,
        u_hist: torch.Tensor,
        z_hist: torch.Tensor,
        u_fut: torch.Tensor,
        decay: torch.Tensor,
        plans: torch.Tensor | None = None,
        spread: Callable[[torch.Tensor], torch.Tensor] | None = None,
        noise: torch.Tensor | None = None,
        decoded_hist: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The plans' decoded rollouts (N, H, x), what the served forecast adds to each (``shift``: (b, H, x) per
        history) and their latent states (N, H, z). ``u_fut`` (b, H, n_u) is each history's plan, whose plan held
        (``held_plan``) sets the shift and the loops' offsets (``rollout_with_held``); ``plans`` and ``spread``
        (default: u_fut itself) are the rows rolled out, with ``noise`` (N, H, z) for samples. z_hist: the
        history's latent states (``decoded_hist``: their decoding, if the caller has it)."""
        held, corr, base, scale = self.plan_held(x_hist, u_hist, z_hist, u_fut, decay, decoded_hist)
        if (plans is None) != (spread is None):
            raise ValueError("served: give the plans' rows and their spread together, or neither")
        plans, spread = (u_fut, _same) if plans is None or spread is None else (plans, spread)
        z_steps, used_steps, hz_steps = self.rollout_with_held(z_hist[:, -1], held, plans, spread, base, scale, noise)
        z, used = torch.stack(z_steps, 1), torch.stack(used_steps, 1)  # (b + N, H, .)
        decoded = self.decode_plan(z, used, hz=None if hz_steps is None else torch.stack(hz_steps, 1))
        nb = x_hist.shape[0]
        return decoded[nb:], self.shift(x_hist, decoded[:nb], corr, held), z[nb:]

    def forecast(
        self,
        x_hist: torch.Tensor,
        u_hist: torch.Tensor,
        u_fut: torch.Tensor,
        noise: torch.Tensor | None = None,
        residual_decay: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised forecast from the posterior mean at the last history step: (batch, H, x_dim), or with
        noise (batch, samples, H, z_dim) the forecast samples (batch, samples, H, x_dim). ``residual_decay``
        (x_dim,) adds the fading decoder's miss at the last step, then the naive blends (``shift``; none: the
        latent forecast alone)."""
        mu, _ = self.encode(x_hist, u_hist)
        z0 = mu[:, -1]
        b, s = u_fut.shape[0], 1 if noise is None else noise.shape[1]
        rows = u_fut.repeat_interleave(s, 0)
        eps = None if noise is None else noise.reshape(b * s, *noise.shape[2:])
        if residual_decay is not None and self.cfg.blend_held_plan:
            out, shift, _ = self.served(
                x_hist, u_hist, mu, u_fut, residual_decay, rows, lambda t: t.repeat_interleave(s, 0), eps
            )
        else:
            out = self.decode_plan(*self.rollout(z0.repeat_interleave(s, 0), rows, eps))
        out = out if noise is None else out.reshape(b, s, *u_fut.shape[1:2], -1)
        if residual_decay is None:
            return out
        if not self.cfg.blend_held_plan:
            return self.blended_alone(x_hist, u_hist, mu, out, residual_decay)
        return self.shifted(out, shift)

    def plan_effect(
        self, x_hist: torch.Tensor, u_hist: torch.Tensor, u_a: torch.Tensor, u_b: torch.Tensor
    ) -> torch.Tensor:
        """How the mean forecast (batch, H, x) changes from plan ``u_b`` to plan ``u_a`` after one history, what a
        what-if answer reports. The served forecast's fading miss and naive blends move every plan alike
        (``shift``), so the change is the decoded rollouts' alone (under model.loop_feedback, both rolled out beside
        the plan held, whose loops' offset they share: ``rollout_with_held``)."""
        mu, _ = self.encode(x_hist, u_hist)
        b, plans = u_a.shape[0], torch.cat([u_a, u_b])
        if self.feedback:  # both plans leave the same columns to their loops: one plan held
            decoded = self.served(x_hist, u_hist, mu, u_a, self.residual_decay(), plans, _twice)[0]
        else:
            decoded = self.decode_plan(*self.rollout(_twice(mu[:, -1]), plans))
        return decoded[:b] - decoded[b:]

    def shift(
        self, x_hist: torch.Tensor, decoded_held: torch.Tensor, corr: torch.Tensor, held: torch.Tensor
    ) -> torch.Tensor:
        """(batch, H, x) what the served forecast adds to every plan's decoded rollout: the decoder's fading miss
        ``corr`` (``correction``), plus what the naive blends (``seasonal``) add to the forecast under the plan
        held, ``decoded_held`` (batch, H, x), driven by ``held`` (batch, H, n_u). The blends then move every
        plan's forecast alike, and a plan's effect passes whole. Under model.loop_feedback the looped controls
        take the loops' pull instead (``loop_shift``): their blends' share drove the rollout already."""
        decoded = decoded_held + corr
        shift = corr + self.seasonal(x_hist, decoded) - decoded
        if not self.feedback:
            return shift
        nl = len(self.plan.looped)
        return torch.cat([shift[..., : self.x_dim - nl], self.loop_shift(x_hist, decoded_held, held)], -1)

    def loop_shift(self, x_hist: torch.Tensor, decoded_held: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """(batch, H, n_looped) the answer's pull of each control its loop decides towards its last value:
        ``loop_pull`` (lead time, loop) times the last value minus the plan held's forecast of it, at the steps
        the plan held (``held``, (batch, H, n_u)) leaves to the loop; zeros without a pull. The answer alone takes
        it: the rollout was driven by the loop's own forecast (``rollout_with_held``), whose blends training
        learned for what they do to the plant. Read from the plan held, it moves every plan alike."""
        nc, nl = self.plan.controls, len(self.plan.looped)
        forecast = decoded_held[..., self.x_dim - nl :]
        if self.loop_pull is None:
            return torch.zeros_like(forecast)
        last = last_measured(x_hist)[:, None, self.x_dim - nl :]  # (batch, 1, n_looped)
        seen = ~torch.isnan(last)
        rows = torch.arange(forecast.shape[-2]).clamp(max=self.loop_pull.shape[0] - 1)
        decides = 1 - held[..., nc : nc + nl]  # a control the plan gives is answered as given
        return self.loop_pull[rows] * decides * seen * (torch.where(seen, last, 0.0) - forecast)

    def shifted(self, decoded: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The served forecast, (batch, [samples,] H, x): the decoded rollouts plus the ``shift`` (batch, H, x).
        Under model.loop_feedback a looped control's forecast is the value that drove the rollout, which holds the
        blends' share already (``rollout_with_held``), plus the answer's pull (``loop_shift``), within the loop's
        limits."""
        shift = shift.unsqueeze(1) if decoded.dim() == 4 else shift
        out = decoded + shift
        if not self.feedback or self.loop_pull is None:  # no pull: the looped columns' shift is 0, as they were
            return out
        nl = len(self.plan.looped)
        looped, pulled = out[..., self.x_dim - nl :], shift[..., self.x_dim - nl :] != 0  # a given control: as given
        return torch.cat([out[..., : self.x_dim - nl], torch.where(pulled, self.within_limits(looped), looped)], -1)

    def blended_alone(
        self,
        x_hist: torch.Tensor,
        u_hist: torch.Tensor,
        z_hist: torch.Tensor,
        decoded: torch.Tensor,
        decay: torch.Tensor,
        decoded_hist: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The served forecast of cards from before model.blend_held_plan: each decoded trajectory (batch,
        [samples,] H, x) plus the fading miss, then blended itself (which shrank every plan's effect)."""
        corr = self.correction(x_hist, z_hist, u_hist, decay, decoded.shape[-2], decoded_hist)
        return self.seasonal(x_hist, decoded + (corr.unsqueeze(1) if decoded.dim() == 4 else corr))

    def losses(
        self,
        x_hist: torch.Tensor,
        u_hist: torch.Tensor,
        x_fut: torch.Tensor,
        u_fut: torch.Tensor,
        tcfg: TrainConfig,
        step_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms for one batch; ``total`` is what training minimises.

        pred: multi-step forecast error of the served forecast (latent rollout plus the fading miss) over the
        (curriculum) horizon, each step weighted by ``step_weights`` (H,) (none: equally), the term that makes this
        a forecaster.
        rec: reconstruction of the history. kl: posterior vs the linear transition prior. lin: rolled-out
        latents vs the encoder's latents of the true future. eig: spectral penalty (the guarantee is structural).
        """
        L = x_hist.shape[1]
        mu, logvar = self.encode(x_hist, u_hist)
        std = (0.5 * logvar).exp()
        z = mu + std * torch.randn_like(std) if self.training else mu
        zh = z[:, :L]
        rec_hist = self.decode(zh, u_hist)
        rec = masked_mse(rec_hist, x_hist)

        A, kp = self.koopman.matrix(), self.koopman
        prior_mu = zh[:, :-1] @ A.T + torch.nan_to_num(u_hist[:, 1:]) @ kp.input_matrix().T + kp.c  # NaN: mean
        prior_logvar = 2 * kp.log_noise
        kl = 0.5 * (
            prior_logvar
            - logvar[:, 1:L]
            + (logvar[:, 1:L].exp() + (mu[:, 1:L] - prior_mu) ** 2) / prior_logvar.exp()
            - 1
        )
        kl = kl.mean()  # per latent dimension, so beta does not scale with z_dim

        R, decay = u_fut.shape[1], self.residual_decay()
        if self.cfg.blend_held_plan:
            decoded, shift, z_roll = self.served(x_hist, u_hist, zh, u_fut, decay, decoded_hist=rec_hist)
            forecast = self.shifted(decoded, shift)
        else:
            z_roll, u_roll = self.rollout(zh[:, -1], u_fut)
            forecast = self.blended_alone(x_hist, u_hist, zh, self.decode_plan(z_roll, u_roll), decay, rec_hist)
        seen = torch.isfinite(x_fut)
        err = torch.where(seen, forecast - torch.nan_to_num(x_fut), 0.0) ** 2
        per_step = err.sum((0, 2)) / seen.sum((0, 2)).clamp(min=1)  # (R,): mean over what was measured
        weights = torch.ones(R) if step_weights is None else step_weights[:R]
        pred = (per_step * weights).sum() / weights.sum()
        lin = torch.zeros(())
        if tcfg.lin_weight > 0:
            # Target: the encoder's latents of the true future, held fixed (half the cost of backprop through it).
            with torch.no_grad():
                mu_all, _ = self.encode(torch.cat([x_hist, x_fut], 1), torch.cat([u_hist, u_fut], 1))
            lin = F.mse_loss(z_roll, mu_all[:, L:])

        moduli = kp.moduli()
        eig = F.relu(moduli - 1).pow(2).mean() if tcfg.eig_target == "<=1" else (moduli - 1).pow(2).mean()
        total = tcfg.rec_weight * rec + tcfg.alpha * pred + tcfg.beta * kl + tcfg.gamma * eig + tcfg.lin_weight * lin
        return {"total": total, "rec": rec, "pred": pred, "kl": kl, "lin": lin, "eig": eig}
