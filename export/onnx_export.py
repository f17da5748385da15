"""Export a trained KoVAE to its two ONNX graphs, check parity with PyTorch, and write them into its version
folder: ``model.onnx`` (series, each with its own history) and ``plans.onnx`` (one history under many plans,
the encoder run once).

Graph inputs (all normalised, float32):
    x_hist (batch, history, n_x), u_hist (batch, history, n_u), u_fut (batch, horizon, n_u),
    where the n_u columns are ``modelcard.card.known_inputs``' (the scaled controls, the looped controls' flags,
    the setpoints and their flags, the card's calendar features, the disturbances and their flags),
    noise (batch, samples, horizon, z_dim) standard normal, for forecast samples.
Graph outputs: mean (batch, horizon, n_x) and samples (batch, samples, horizon, n_x).

A, B, c, the noise scale, the per-variable fading of the decoder's miss at the last history step and the
calibrated interval width (training.model.IntervalWidth) are folded into constants. The rollout covers the
card's maximum horizon, unrolled (see ForecastGraph), and is sliced to the requested horizon, so the horizon
stays dynamic and the graph has no loop op and no eigen-decomposition.
Scalers stay outside the graph (the card holds them).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

from modelcard.card import (
    ONNX_FILE,
    Calendar,
    CardError,
    atomic_write,
    exogenous_outputs,
    fast_outputs,
    loop_limits,
    looped_controls,
    output_names,
    read_card,
    scalers,
    sha256_file,
    stability_summary,
    write_card,
)
from training.config import ModelConfig
from training.model import (
    IntervalWidth,
    KoVAE,
    PlanLayout,
    band_space,
    calibrated_samples,
    scaled_limits,
)

OPSET = 17  # runs on every onnxruntime 1.2x/1.3x
PARITY_TOL = 1e-4
INPUTS = ("x_hist", "u_hist", "u_fut", "noise")
PLANS_FILE = "plans.onnx"
OUTPUTS = ("mean", "samples")


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance; nothing was written."""


class ForecastGraph(nn.Module):
    """The serving computation of a KoVAE with its operator frozen into constants.

    The rollout z[k] = A z[k-1] + d[k] is unrolled over the card's maximum horizon (one MatMul and one Add a
    step, time-major) and sliced to the requested one; the mean and the samples are rows of the same rollout.
    It was once one causal Toeplitz product per mode of A: no step loop, but two transposes of every (batch,
    step, latent) tensor, which for 1,000 control plans alone took 130 ms of ONNX Runtime's time against 16 ms
    for the whole unrolled recurrence (and a single forecast went from 1.61 to 1.42 ms). The decoder runs on
    2-D (rows, z) views, so ONNX Runtime fuses each Linear into one Gemm; the plans graph decodes step by step,
    so each step's (plans, hidden) activations stay in cache instead of 100 MB tensors.
    Every decoded trajectory then gets the decoder's miss at the last history step, times g^k per variable
    (calibration.residual_decay; a card without it has no such term), by the model's own ``correction``, and
    the blend with the same time a day earlier (the model's ``seasonal``).
    """

    def __init__(
        self,
        model: KoVAE,
        max_horizon: int,
        calib: dict[str, Any],
        *,
        plans: bool = False,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.plans = plans  # one history (batch 1) under many plans: the batch of u_fut
        kp = model.koopman
        with torch.no_grad():
            self.register_buffer("At", kp.matrix().T.contiguous().clone())
            self.register_buffer("Bt", kp.input_matrix().T.contiguous().clone())
            self.register_buffer("c", kp.c.clone())
            self.register_buffer("noise_std", kp.log_noise.exp().clone())
            decay = calib.get("residual_decay")
            decay = None if decay is None else torch.tensor(decay, dtype=torch.float32)
            self.register_buffer("residual_decay", decay)  # None: a card from before the residual fading
        self.width = IntervalWidth(model.x_dim, calib)  # the calibrated interval width, per window
        self.max_horizon = max_horizon
        # Eval mode for the wrapper too: torch.onnx.export restores the wrapper's mode afterwards, and a
        # wrapper left in training mode would switch the model's dropout back on for the parity reference.
        self.eval()

    def rollout(
        self, z0: torch.Tensor, drive: torch.Tensor, u: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """z[1..Hmax], each (N, z): z[k] = A z[k-1] + drive[k], unrolled over the card's maximum horizon from z0
        (N, z), with drive[k] = B u[k] + c (+ noise) time-major (Hmax, N, z): each step reads one contiguous block.
        Under model.loop_feedback each step also gets B times what the loops add to u[k] (the model's
        ``loop_inputs``); returns the states and the inputs that drove them (Hmax, N, n_u). Cards from before
        model.blend_held_plan (or without the fading miss) only: the others roll out beside their plan held."""
        z, out, used = z0, [], []
        for k in range(self.max_horizon):
            if self.model.feedback:
                step = self.model.loop_inputs(z, u[k])
                z = z @ self.At + drive[k] + (step - u[k]) @ self.Bt
                used.append(step)
            else:
                z = z @ self.At + drive[k]
            out.append(z)
        return out, torch.stack(used) if used else u

    def decode(self, z: torch.Tensor, u: torch.Tensor, hz: torch.Tensor | None = None) -> torch.Tensor:
        """The model's decoder on the rows of 2-D views of z (B, ..., z_dim) and the known inputs of the same steps
        u (B, ..., n_u) -> (B, ..., x_dim) (``hz``: z's share of the first layer, if the rollout has it). The
        second axis is reshaped as -1: it may be 0 (no samples), and ONNX reads a 0 in a shape as "keep that
        dim"."""
        flat = None if hz is None else hz.reshape(-1, hz.shape[-1])
        rows = self.model.decode_plan(z.reshape(-1, z.shape[-1]), u.reshape(-1, u.shape[-1]), complete=True, hz=flat)
        return rows.reshape(z.shape[0], -1, *z.shape[2:-1], self.model.x_dim)

    def decode_steps(
        self, z: list[torch.Tensor], u: list[torch.Tensor], hz: list[torch.Tensor] | None, horizon: int
    ) -> torch.Tensor:
        """Each step's states (N, z) and inputs (N, n_u), decoded to (N, h, x): every step of the unrolled maximum
        horizon, then sliced to the requested one (a tensor slice, which the graph keeps dynamic). The plans graph
        decodes step by step, so each step's (plans, hidden) activations stay in cache, and computes z's share of
        the first layer again (``hz``, the rollout's, kept for every step of 1,000 plans is 100 MB, which made
        1,000 plans 30% slower than computing it twice); the other stacks the steps and decodes them at once."""
        if self.plans:
            x = [self.model.decode_plan(zk, uk, complete=True) for zk, uk in zip(z, u, strict=True)]
            return torch.stack(x, 1)[:, :horizon]
        first = None if hz is None else torch.stack(hz)[:horizon]
        return self.decode(torch.stack(z)[:horizon], torch.stack(u)[:horizon], first).transpose(0, 1)

    def forward(
        self, x_hist: torch.Tensor, u_hist: torch.Tensor, u_fut: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        mu, _ = m.encode(x_hist, u_hist)
        # (B, z). Plans: (1, z), the encoder run once; every step below broadcasts this one history (its state,
        # its last values, its day-earlier values) over the plans, so nothing is copied per plan.
        z0 = mu[:, -1]
        horizon, (n, n_samples) = u_fut.shape[1], noise.shape[:2]  # n: series (or plans)
        pad, (z_dim, n_u) = self.max_horizon - horizon, (z0.shape[1], u_fut.shape[2])
        u = F.pad(u_fut, (0, 0, 0, pad))  # (n, Hmax, n_u)
        # The rows rolled out: the means (n, no noise), then the samples (n*S, noise on the drive); S = 0 (mean
        # only) leaves the sample rows empty.
        us = u.unsqueeze(1).expand(-1, n_samples, -1, -1).reshape(-1, self.max_horizon, n_u)  # (n*S, Hmax, .)
        eps = F.pad(noise, (0, 0, 0, pad)).reshape(-1, self.max_horizon, z_dim)  # (n*S, Hmax, z)
        if m.cfg.blend_held_plan and self.residual_decay is not None:
            # The rows roll out beside the plan held, in one step loop (the model's ``served``): its served
            # forecast sets what the fading miss and the naive blends add to every row, and the loops' offset. A
            # plans graph's plans are alike (the same variables given at the same steps, and where the history gives
            # none the same first value: modelcard.runtime.one_plan_held), so they have one plan held, rolled out
            # and decoded once instead of once per plan.
            rows = torch.cat([u, us])  # (n + n*S, Hmax, n_u)
            if self.plans:

                def spread(t: torch.Tensor) -> torch.Tensor:  # the one history's value on every row
                    return t + torch.zeros_like(rows[:, 0, :1])

            else:

                def spread(t: torch.Tensor) -> torch.Tensor:  # each series' value on its mean and sample rows
                    return torch.cat([t, t.unsqueeze(1).expand(-1, n_samples, -1).reshape(-1, t.shape[-1])])

            held, corr, base, scale = m.plan_held(x_hist, u_hist, mu, u[:1] if self.plans else u, self.residual_decay)
            noise_rows = torch.cat([torch.zeros_like(u[..., :1]).expand(-1, -1, z_dim), eps])
            operator = (self.At.T, self.Bt.T)
            z, used, hz = m.rollout_with_held(z0, held, rows, spread, base, scale, noise_rows, operator)
            x = self.decode_steps(z, used, hz, horizon)  # (held + n + n*S, h, x)
            nb = held.shape[0]
            shift = m.shift(x_hist, x[:nb], corr[:, :horizon], held[:, :horizon])
            mean, raw = x[nb : nb + n], x[nb + n :].reshape(n, -1, horizon, m.x_dim)  # raw: (n, S, h, x)
            mean, raw = m.shifted(mean, shift), m.shifted(raw, shift)
        else:  # cards from before model.blend_held_plan (or without the decoder's fading miss)
            ut, ust = u.transpose(0, 1), us.transpose(0, 1)  # time-major
            starts = z0.unsqueeze(1) + torch.zeros_like(noise[:, :, 0])  # (n, S, z)
            rows0 = torch.cat([z0 + torch.zeros_like(ut[0, :, :1]), starts.reshape(-1, z_dim)])  # (n + n*S, z)
            drive = torch.cat([ut @ self.Bt + self.c, ust @ self.Bt + self.c + eps.transpose(0, 1) * self.noise_std], 1)
            steps, u_rows = self.rollout(rows0, drive, torch.cat([ut, ust], 1))
            x = self.decode_steps(steps, list(u_rows.unbind(0)), None, horizon)
            mean, raw = x[:n], x[n:].reshape(n, -1, horizon, m.x_dim)
            if self.residual_decay is not None:
                mean, raw = (m.blended_alone(x_hist, u_hist, mu, t, self.residual_decay) for t in (mean, raw))
        width = self.width(x_hist, u_fut, u_hist)
        return mean, calibrated_samples(mean, raw, width, self.width.bounds, self.model.saturation())


# What cards written before a model setting existed were trained without.
BEFORE = {
    "decoder_controls": False,
    "decoder_skip": False,
    "decoder_fast_only": False,
    "blend_held_plan": False,
    "seasonal_adaptive": False,
    "correction_last_seen": False,
    "blend_last_seen": False,
    "exogenous_modes": 0,
    "loop_feedback": False,
    "dropout_per_sequence": False,
}


def model_config(card: dict[str, Any]) -> ModelConfig:
    """The model settings a card was trained with; a setting the card does not name is what came before it
    (``BEFORE``): cards written before the decoder read the controls decode z alone, and so on."""
    return ModelConfig(**{**BEFORE, **{k: v for k, v in card["model"].items() if k != "type"}})


def load_model(version_dir: Path, *, verify: bool = True) -> tuple[KoVAE, dict[str, Any]]:
    """Rebuild a stored version's KoVAE (eval mode) from its card and weights.pt; returns (model, card)."""
    card = read_card(version_dir, verify=verify)
    cfg = model_config(card)
    n_d = len(card["variables"].get("disturbance_inputs", {}).get("variables", []))
    n_s = len(card["variables"].get("setpoint_inputs", {}).get("variables", []))
    looped = tuple(looped_controls(card))  # forecast after the measurements too
    # The leading columns of u, which the decoder reads for the fast outputs.
    variables = card["variables"]
    _, _, u_mean, u_std = scalers(card)
    limits = scaled_limits(loop_limits(variables), looped, u_mean, u_std) if looped else ()
    plan = PlanLayout(
        len(variables["controls"]),
        looped,
        n_s,
        tuple(fast_outputs(variables)),
        tuple(exogenous_outputs(variables)),
        limits,
    )
    n_u = plan.fed + Calendar.from_card(card).size + 2 * n_d
    model = KoVAE(len(card["variables"]["measurements"]) + len(looped), n_u, cfg, plan)
    weights = Path(version_dir) / "weights.pt"
    try:
        model.load_state_dict(torch.load(weights, weights_only=True))
    except FileNotFoundError:
        raise CardError(f"{weights} is missing: the version's weights are gone; nothing to rebuild") from None
    except Exception as exc:  # a damaged pickle or zip raises any of many types (UnpicklingError, RuntimeError, ...)
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise CardError(f"{weights} cannot be read as this card's model weights ({why})") from None
    # Not in the weights: calibration sets them (KoVAE.gap_pull, KoVAE.loop_pull).
    for name in ("gap_pull", "loop_pull"):
        table = card["calibration"].get(name)
        if table is not None:
            setattr(model, name, torch.tensor(table, dtype=torch.float32))
    return model.eval(), card


def _example(batch: int, history: int, horizon: int, samples: int, dims: tuple[int, int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nx, nu, nz = dims
    return (
        torch.randn(batch, history, nx, generator=g),
        torch.randn(batch, history, nu, generator=g),
        torch.randn(batch, horizon, nu, generator=g),
        torch.randn(batch, samples, horizon, nz, generator=g),
    )


def to_onnx_bytes(graph: ForecastGraph, history: int, metadata: dict[str, str]) -> bytes:
    """Legacy (TorchScript) exporter: the dynamo exporter froze dynamic lengths of GRUs and rollouts."""
    m = graph.model
    example = _example(2, history, max(2, graph.max_horizon // 2), 3, (m.x_dim, m.u_dim, m.cfg.z_dim))
    batch = {0: "batch"}
    if graph.plans:  # x_hist and u_hist: one history; u_fut and noise: one row per plan
        example = (example[0][:1], example[1][:1], example[2], example[3])
        batch = {}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Known and handled, so not printed on every export: the TorchScript exporter is deprecated (kept: the
        # dynamo exporter froze the dynamic lengths), and its GRU note on batch sizes other than 1 (the encoder
        # starts from a zero state; parity is checked on batches of 1 to 7 and on held-out windows).
        warnings.filterwarnings("ignore", ".*legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.filterwarnings("ignore", ".*batch_size other than 1.*GRU", UserWarning)
        # nn.GRU's own input-size checks, constant once traced.
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            example,
            buf,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes={
                "x_hist": {**batch, 1: "history"},
                "u_hist": {**batch, 1: "history"},
                "u_fut": {0: "batch", 1: "horizon"},
                "noise": {0: "batch", 1: "samples", 2: "horizon"},
                "mean": {0: "batch", 1: "horizon"},
                "samples": {0: "batch", 1: "samples", 2: "horizon"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def parity(graph: ForecastGraph, onnx_bytes: bytes, history: int, windows: list[tuple[np.ndarray, ...]] | None = None):
    """Largest |ORT - torch| over several batch sizes, history lengths and horizons (normalised units)."""
    m = graph.model
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    H = graph.max_horizon
    cases = [
        (1, history, H, 1),
        (4, history, 1, 2),
        (7, max(2, history // 2), max(1, H // 3), 5),
        (3, 2 * history, H, 1),
        (2, history, H, 0),  # mean only: the service sends no noise when no quantiles are asked for
    ]
    worst = 0.0
    for i, (b, L, h, s) in enumerate(cases):
        feeds = _example(b, L, h, s, (m.x_dim, m.u_dim, m.cfg.z_dim), seed=100 + i)
        worst = max(worst, _compare(graph, sess, feeds))
    for xh, uh, uf in windows or []:
        noise = np.random.default_rng(0).standard_normal((len(xh), 2, uf.shape[1], m.cfg.z_dim)).astype(np.float32)
        worst = max(worst, _compare(graph, sess, tuple(torch.from_numpy(a) for a in (xh, uh, uf, noise))))
    return worst


def plans_parity(graph: ForecastGraph, plans_bytes: bytes, history: int, x_hist: torch.Tensor | None = None) -> float:
    """Largest |ORT plans graph - torch| where torch runs the ordinary graph on the history repeated per plan
    (``x_hist``, (1, history, x): that history's measurements, e.g. with a gap)."""
    m = graph.model
    sess = ort.InferenceSession(plans_bytes, providers=["CPUExecutionProvider"])
    H, worst = graph.max_horizon, 0.0
    for i, (n_plans, h, s) in enumerate([(1, H, 2), (5, max(1, H // 3), 0), (9, H, 1)]):
        x, u, uf, noise = _example(n_plans, history, h, s, (m.x_dim, m.u_dim, m.cfg.z_dim), seed=200 + i)
        x, u = (x[:1] if x_hist is None else x_hist), u[:1]
        # Plans alike, as the service sends them: only their values differ (not the flags, calendar, influent).
        shared = [c for c in range(m.u_dim) if c not in m.plan.values]
        uf[:, :, shared] = uf[:1, :, shared]
        with torch.no_grad():
            ref = [t.numpy() for t in graph(x.expand(n_plans, -1, -1), u.expand(n_plans, -1, -1), uf, noise)]
        got = sess.run(
            list(OUTPUTS), {"x_hist": x.numpy(), "u_hist": u.numpy(), "u_fut": uf.numpy(), "noise": noise.numpy()}
        )
        error = sample_error(graph, x.expand(n_plans, -1, -1), u.expand(n_plans, -1, -1), uf, ref[1], got[1])
        worst = max(worst, float(np.max(np.abs(ref[0] - got[0]))), error)
    return worst


def sample_error(
    graph: ForecastGraph,
    x_hist: torch.Tensor,
    u_hist: torch.Tensor,
    u_fut: torch.Tensor,
    ref: np.ndarray,
    got: np.ndarray,
):
    """The largest difference of two sets of samples where the graph computes them: in band space when the card
    has bounds (near a bound, a value's logit magnifies rounding that the value itself does not show), and as
    if before the calibrated width widened them (it multiplies rounding error too)."""
    if ref.size == 0:
        return 0.0
    bounds = graph.width.bounds
    if bounds is not None:
        ref, got = (band_space(torch.from_numpy(a).double(), *(b.double() for b in bounds)).numpy() for a in (ref, got))
    return float(np.max(np.abs(ref - got) / sample_scale(graph, x_hist, u_hist, u_fut)))


def sample_scale(graph: ForecastGraph, x_hist: torch.Tensor, u_hist: torch.Tensor, u_fut: torch.Tensor) -> np.ndarray:
    """(B, 1, 1, x): the samples' differences are compared as if before the calibrated width widened them (it
    multiplies rounding error too)."""
    with torch.no_grad():
        return np.maximum(graph.width(x_hist, u_fut, u_hist).numpy(), 1.0)[:, None, None, :]


def _compare(graph: ForecastGraph, sess: ort.InferenceSession, feeds: tuple[torch.Tensor, ...]) -> float:
    with torch.no_grad():
        ref = [t.numpy() for t in graph(*feeds)]
    got = sess.run(list(OUTPUTS), {n: t.numpy() for n, t in zip(INPUTS, feeds, strict=True)})
    for r, g in zip(ref, got, strict=True):
        if r.shape != g.shape:
            raise ParityError(f"ONNX output shape {g.shape} differs from PyTorch {r.shape}")
    return max(
        float(np.max(np.abs(ref[0] - got[0]))), sample_error(graph, feeds[0], feeds[1], feeds[2], ref[1], got[1])
    )


def naive_blend_summary(model: KoVAE, card: dict[str, Any]) -> dict[str, Any]:
    """The learned weights of the two naive forecasts in the forecast, per variable at 15 min, 5 h and 24 h
    (0: the model alone, 1: the naive forecast alone). With the adaptive weight of yesterday
    (``model.seasonal_adaptive``) each window's is s = c / (c + m2): the card gives c, the model's own error, and
    a history whose yesterday missed today by m2 = c (mean squared, in units of the variable's std) takes half."""
    names = output_names(card)
    adaptive = model.cfg.seasonal_adaptive
    with torch.no_grad():
        seasonal = (model.seasonal_logit.exp() if adaptive else torch.sigmoid(model.seasonal_logit)).numpy()
        persistence = torch.sigmoid(model.persistence_logit).numpy()
    steps = [s for s in (1, 20, 96) if s <= card["max_horizon"]]
    out: dict[str, Any] = {"seasonal_steps": model.cfg.seasonal_steps, "steps": steps}
    if adaptive:
        out["seasonal_is"] = "c in s = c / (c + m2), m2: how far yesterday missed today over the history's end"
    for key, w in (("seasonal", seasonal), ("persistence", persistence)):
        out[key] = {n: [round(float(w[min(s, len(w)) - 1, j]), 4) for s in steps] for j, n in enumerate(names)}
    if model.cfg.seasonal_steps <= 0:
        out["seasonal"] = {}
    return out


def residual_summary(decay: list[float], card: dict[str, Any]) -> dict[str, Any]:
    """How long each variable's measured offset from the decoder persists in a forecast (half-life, hours)."""
    hours = card["sample_minutes"] / 60
    names = output_names(card)
    # g = 0: gone at once; g = 1 (float32 rounding of a g near 1): never fades, written as null.
    half_life = {
        n: (math.log(0.5) / math.log(g) * hours if 0 < g < 1 else (0.0 if g <= 0 else None))
        for n, g in zip(names, decay, strict=True)
    }
    return {"residual_decay_max": max(decay), "residual_half_life_hours": half_life}


def export_version(
    model: KoVAE,
    card: dict[str, Any],
    version_dir: Path,
    windows: list[tuple[np.ndarray, ...]] | None = None,
) -> dict[str, Any]:
    """Export, check parity, then write model.onnx and the completed card atomically; returns the card.

    On a parity failure nothing in ``version_dir`` is touched.
    """
    calib = card["calibration"]
    graph = ForecastGraph(model, card["max_horizon"], calib)
    stability = stability_summary(graph.At.T.double().numpy(), card["sample_minutes"])
    created = card.get("created_at") or datetime.now(UTC).isoformat(timespec="seconds")
    metadata = {
        "version": card["version"],
        "created_at": created,
        "data_hash": card["data"]["config_hash"],
        "spectral_radius": repr(stability["spectral_radius"]),
        "stability_margin": repr(stability["stability_margin"]),
        "eigenvalues": json.dumps([[e["real"], e["imag"]] for e in stability["eigenvalues"]]),
    }
    onnx_bytes = to_onnx_bytes(graph, card["history"]["length"], metadata)
    worst = parity(graph, onnx_bytes, card["history"]["length"], windows)
    if not worst <= PARITY_TOL:
        raise ParityError(f"ONNX Runtime differs from PyTorch by {worst:.3g} (> {PARITY_TOL:g}); nothing written")
    plans_graph = ForecastGraph(model, card["max_horizon"], calib, plans=True)
    plans_bytes = to_onnx_bytes(plans_graph, card["history"]["length"], metadata)
    plans_worst = plans_parity(graph, plans_bytes, card["history"]["length"])
    if not plans_worst <= PARITY_TOL:
        raise ParityError(f"the plans graph differs from PyTorch by {plans_worst:.3g}; nothing written")
    version_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(version_dir / ONNX_FILE, onnx_bytes)
    atomic_write(version_dir / PLANS_FILE, plans_bytes)
    card = {
        **card,
        "created_at": created,
        "operator": {
            "form": "z[t+1] = A z[t] + B u[t+1] + c (+ noise_std * eps for samples), normalised units; "
            "forecast x[t+k] = D(z[t+k]) + g^k (x[t] - D(z[t])) with g = calibration.residual_decay per variable, "
            "then blended with the same time a day earlier and with the last measured value (naive_blend); "
            "a sensor down at the history's end is pulled further to its last value (calibration.gap_pull); "
            "a looped control's forecast is pulled towards its last value (calibration.loop_pull)",
            "naive_blend": naive_blend_summary(model, card),
            "A": graph.At.T.tolist(),
            "B": graph.Bt.T.tolist(),
            "c": graph.c.tolist(),
            "noise_std": graph.noise_std.tolist(),
        },
        "stability": {**stability, **residual_summary(calib.get("residual_decay", [0.0] * model.x_dim), card)},
        "onnx": {
            "file": ONNX_FILE,
            "sha256": sha256_file(version_dir / ONNX_FILE),
            "opset": OPSET,
            "inputs": list(INPUTS),
            "outputs": list(OUTPUTS),
            "parity_max_abs_error": worst,
            "scalers": "outside_graph",
            # The same model for one history under many control plans (x_hist, u_hist: batch 1; u_fut, noise:
            # one row per plan): the encoder runs once.
            "plans_file": PLANS_FILE,
            "plans_sha256": sha256_file(version_dir / PLANS_FILE),
            "plans_parity_max_abs_error": plans_worst,
        },
    }
    write_card(version_dir, card)
    return card
