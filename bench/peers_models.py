"""The forecasters a data team would pit against the KoVAE, trained on the KoVAE's own windows and known inputs.

Every peer sees what the KoVAE sees: the normalised history of x (``Prepared.nx``, NaN where a sensor was down,
forward-filled here since none of them masks), and the known-input rows ``Prepared.inputs`` builds (controls, loop
flags, setpoint columns, calendar, disturbance columns). Training windows carry every control's true future and
each batch is told what plants tell with ``training.loop.with_requests``, exactly as the KoVAE is trained, so a
peer learns to forecast from the honest request too. Forecasts are normalised (N, H, nx): x's every column, the
catalog's targets and then the looped controls, as the KoVAE's.

- ``MamKO``: the Mamba-based Koopman operator (ICLR 2025), from its published description.
- ``GRUSeq2Seq``: a GRU encoder over the history, a GRU decoder over the known future inputs.
- ``LightGBMDirect``: gradient-boosted trees, one per variable, direct at every horizon step (the step a feature).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training import evaluate as ev
from training.config import TrainConfig
from training.loop import with_requests
from training.model import masked_mse
from training.prepare import Prepared, tensors


@dataclass(frozen=True)
class Sizes:
    """How big the peers are and how long they train (``QUICK`` for tests, ``DEFAULT`` for the bench)."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    hidden: int = 64  # GRU width, and the width of MamKO's lift and selective projection
    z_dim: int = 32  # MamKO's latent size (B and C per step grow with it: 64 doubled MamKO's time)
    conv_width: int = 4  # MamKO's causal convolution (Mamba's default)
    lgb_rounds: int = 100
    lgb_lr: float = 0.1
    lgb_leaves: int = 31
    lgb_steps: int = 6  # horizon steps drawn per training window for the trees' rows
    max_train_windows: int = 20000  # trees: windows sampled for rows (the torch peers use every window)
    threads: int = 2
    seed: int = 0


QUICK = Sizes(epochs=2, batch_size=32, hidden=16, z_dim=8, lgb_rounds=10, lgb_leaves=7, lgb_steps=4)
# Default sizes, sized for the whole bench within an hour on 2 cores with the default preset (3,130 training
# windows, history 128, horizon 96): per batch of 64 on this 2-core machine, shared with a training run, MamKO
# took 4.2 s (3.5 min an epoch), the GRU 3.6-4.6 s (3-3.7 min), and LightGBM 0.1-0.4 s a round on 19k rows (an
# estimate from timings, not a timed full run).
DEFAULT = Sizes()


def filled(x: torch.Tensor) -> torch.Tensor:
    """A normalised history with each gap holding the last value before it (0, the mean, before any)."""
    return torch.from_numpy(ev.forward_filled(x.numpy()))


class TorchPeer(nn.Module):
    """A torch peer: ``forward(x_hist, u_hist, u_fut)`` normalised, trained with the KoVAE's request draws."""

    name = "torch"
    train_seconds = 0.0

    def fit(self, p: Prepared, t: TrainConfig, sizes: Sizes) -> TorchPeer:
        """Adam on the masked forecast MSE over the whole horizon; the epoch best on the validation windows told
        the honest request is kept (the KoVAE picks its epoch the same way)."""
        torch.manual_seed(sizes.seed)
        torch.set_num_threads(sizes.threads)
        start = time.perf_counter()
        xh, uh, xf, uf = tensors(p, p.train, request="applied")
        xh, uh, uf = filled(xh), torch.nan_to_num(uh), torch.nan_to_num(uf)
        closed = torch.from_numpy(p.closed_loops(p.train))
        vxh, vuh, vxf, vuf = tensors(p, p.val, request="honest")
        vxh, vuh, vuf = filled(vxh), torch.nan_to_num(vuh), torch.nan_to_num(vuf)
        opt = torch.optim.Adam(self.parameters(), lr=sizes.lr)
        gen = torch.Generator().manual_seed(sizes.seed)
        best, best_state = float("inf"), copy.deepcopy(self.state_dict())
        for _ in range(sizes.epochs):
            self.train()
            for b in torch.randperm(len(xh), generator=gen).split(sizes.batch_size):
                u_hist, u_fut = with_requests(uh[b], uf[b], closed[b], p, t, gen)
                loss = masked_mse(self(xh[b], u_hist, u_fut), xf[b])
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.parameters(), 1.0)
                opt.step()
            self.eval()
            with torch.no_grad():
                val = float(masked_mse(self(vxh, vuh, vuf), vxf))
            if val < best:
                best, best_state = val, copy.deepcopy(self.state_dict())
        self.load_state_dict(best_state)
        self.train_seconds = time.perf_counter() - start
        return self

    def forecast(self, x_hist: np.ndarray, u_hist: np.ndarray, u_fut: np.ndarray) -> np.ndarray:
        """(N, H, nx) normalised forecasts from normalised numpy inputs (NaN gaps allowed)."""
        self.eval()
        with torch.no_grad():
            xh = torch.from_numpy(ev.forward_filled(x_hist.astype(np.float32)))
            out = self(xh, torch.from_numpy(np.nan_to_num(u_hist)).float(), torch.from_numpy(np.nan_to_num(u_fut)))
        return out.numpy()


class MamKO(TorchPeer):
    """Mamba-based Koopman operator (MamKO, ICLR 2025) as published, written from its description.

    Lift z_0 = MLP(x_last) (Linear, ReLU, Linear). Over the horizon z[k+1] = exp(Delta_k A) z[k] + Bbar_k u[k]
    with A diagonal and negative (A = -exp(a)), zero-order hold Bbar_k = (exp(Delta_k A) - 1) / A * B_k, and
    x[k+1] = C_{k+1} z[k+1]. Delta_k (softplus), B_k and C_k are generated from the recent history (states and
    inputs projected, SiLU, a depthwise causal 1-D convolution over time, SiLU, one linear layer split into
    Delta, B, C): the selective scan. Given those, the latent is linear in u, so predictive control over it is
    a QP. Loss: MSE over the horizon.

    Where it departs: (1) the generated parameters of horizon step k are the convolution's output at history
    step L - H + k (the last history step drives the last horizon step); a horizon longer than the history
    (BSM1: 96 steps on 128 is fine, the tiny preset's 16 on 20 too) holds the first one. (2) u is every known
    input the KoVAE gets (controls, loop flags, setpoints, calendar, disturbance columns), not the controls
    alone, so the comparison is on the same information; a looped control left to its loop reads 0 with its
    flag 0, as for every model here. (3) It is trained on the product's horizon (96 steps, 24 h) with the
    KoVAE's request draws, not on the paper's shorter horizon. (4) x_last is the history's last value
    forward-filled over sensor gaps.
    """

    name = "mamko"

    def __init__(self, nx: int, nk: int, sizes: Sizes) -> None:
        super().__init__()
        z, h = sizes.z_dim, sizes.hidden
        self.nx, self.nk, self.z = nx, nk, z
        self.lift = nn.Sequential(nn.Linear(nx, h), nn.ReLU(), nn.Linear(h, z))
        self.a = nn.Parameter(torch.log(torch.linspace(0.05, 1.0, z)))  # A = -exp(a): slow to fast modes
        self.proj = nn.Linear(nx + nk, h)
        self.conv = nn.Conv1d(h, h, sizes.conv_width, groups=h, padding=sizes.conv_width - 1)
        self.select = nn.Linear(h, z + z * nk + nx * z)  # Delta, B, C per step

    def generated(self, x_hist: torch.Tensor, u_hist: torch.Tensor, H: int) -> tuple[torch.Tensor, ...]:
        """(Delta (B, H, z), B (B, H, z, nk), C (B, H, nx, z)) from the history, one set per horizon step."""
        L = x_hist.shape[1]
        s = nn.functional.silu(self.proj(torch.cat([x_hist, u_hist], -1)))  # (B, L, h)
        s = self.conv(s.transpose(1, 2))[..., :L].transpose(1, 2)  # causal: the right padding dropped
        s = s[:, torch.clamp(torch.arange(L - H, L), min=0)]  # the steps that drive the horizon's
        s = self.select(nn.functional.silu(s))  # (B, H, z + z nk + nx z)
        z, nk, nx = self.z, self.nk, self.nx
        delta = nn.functional.softplus(s[..., :z])
        Bm = s[..., z : z + z * nk].reshape(*s.shape[:2], z, nk)
        Cm = s[..., z + z * nk :].reshape(*s.shape[:2], nx, z)
        return delta, Bm, Cm

    def forward(self, x_hist: torch.Tensor, u_hist: torch.Tensor, u_fut: torch.Tensor) -> torch.Tensor:
        H = u_fut.shape[1]
        delta, Bm, Cm = self.generated(x_hist, u_hist, H)
        A = -torch.exp(self.a)  # (z,)
        z = self.lift(x_hist[:, -1])
        out = []
        for k in range(H):
            decay = torch.exp(delta[:, k] * A)
            zoh = (decay - 1) / A  # ZOH of B
            z = decay * z + zoh * torch.einsum("bzk,bk->bz", Bm[:, k], u_fut[:, k])
            out.append(torch.einsum("bxz,bz->bx", Cm[:, k], z))
        return torch.stack(out, 1)


class GRUSeq2Seq(TorchPeer):
    """GRU sequence to sequence with known future inputs: an encoder over (history, its known inputs), a decoder
    over the future's known inputs started from the encoder's state; it forecasts the change from the last
    value (what persistence would say), the usual residual form."""

    name = "gru"

    def __init__(self, nx: int, nk: int, sizes: Sizes) -> None:
        super().__init__()
        self.encoder = nn.GRU(nx + nk, sizes.hidden, batch_first=True)
        self.decoder = nn.GRU(nk, sizes.hidden, batch_first=True)
        self.head = nn.Linear(sizes.hidden, nx)

    def forward(self, x_hist: torch.Tensor, u_hist: torch.Tensor, u_fut: torch.Tensor) -> torch.Tensor:
        _, h = self.encoder(torch.cat([x_hist, u_hist], -1))
        y, _ = self.decoder(u_fut, h)
        return x_hist[:, -1:] + self.head(y)


class LightGBMDirect:
    """Gradient-boosted trees, direct multi-horizon: one LightGBM regressor per variable on rows (window, step
    h), forecasting the change from the last value at h from the last values, their changes over 1, 4, 16 and
    a day of steps (as far as the history reaches), the known inputs at the target step (calendar and plan
    there), the plan's mean over steps 1..h and at the history's end, and h. Missing values stay NaN (trees
    route them)."""

    name = "lightgbm"

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self.models: list = []
        self.fed = 0
        self.train_seconds = 0.0

    def features(self, x_hist: np.ndarray, u_hist: np.ndarray, u_fut: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Rows (len(steps) * N) for each window at each 1-based step in ``steps`` (N, S)."""
        N, L, _ = x_hist.shape
        last = ev.forward_filled(x_hist)[:, -1]
        lags = [lag for lag in (1, 4, 16, 96) if lag < L]
        own = [last, *(last - ev.forward_filled(x_hist)[:, -1 - lag] for lag in lags)]
        plan = np.cumsum(u_fut[..., : self.fed], 1) / np.arange(1, u_fut.shape[1] + 1)[:, None]
        rows = []
        for j in range(steps.shape[1]):
            h = steps[:, j]
            at = np.arange(N), h - 1
            rows.append(np.concatenate([*own, u_fut[at], plan[at], u_hist[:, -1, : self.fed], h[:, None]], 1))
        return np.concatenate(rows).astype(np.float32)

    def fit(self, p: Prepared, t: TrainConfig, sizes: Sizes) -> LightGBMDirect:
        import lightgbm as lgb

        start = time.perf_counter()
        rng = np.random.default_rng(sizes.seed)
        xh, uh, xf, uf = tensors(p, p.train, request="applied")
        closed = torch.from_numpy(p.closed_loops(p.train))
        uh, uf = with_requests(uh, uf, closed, p, t, torch.Generator().manual_seed(sizes.seed))
        keep = rng.permutation(len(xh))[: sizes.max_train_windows]
        xh, uh, xf, uf = (a.numpy()[keep] for a in (xh, uh, xf, uf))
        self.fed = p.fed_columns()
        H = xf.shape[1]
        steps = rng.integers(1, H + 1, (len(xh), min(sizes.lgb_steps, H)))
        F = self.features(xh, uh, uf, steps)
        last = ev.forward_filled(xh)[:, -1]
        target = np.concatenate([xf[np.arange(len(xh)), steps[:, j] - 1] - last for j in range(steps.shape[1])])
        params = {
            "objective": "regression",
            "num_leaves": sizes.lgb_leaves,
            "learning_rate": sizes.lgb_lr,
            "max_bin": 63,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "feature_fraction": 0.8,
            "num_threads": sizes.threads,
            "seed": sizes.seed,
            "verbose": -1,
        }
        self.models = []
        for v in range(xf.shape[-1]):
            seen = np.isfinite(target[:, v])
            data = lgb.Dataset(F[seen], target[seen, v])
            self.models.append(lgb.train(params, data, num_boost_round=sizes.lgb_rounds))
        self.train_seconds = time.perf_counter() - start
        return self

    def forecast(self, x_hist: np.ndarray, u_hist: np.ndarray, u_fut: np.ndarray) -> np.ndarray:
        N, H = u_fut.shape[:2]
        steps = np.broadcast_to(np.arange(1, H + 1), (N, H))
        F = self.features(x_hist, u_hist, u_fut, steps)  # step-major: row j * N + i
        last = ev.forward_filled(x_hist)[:, -1]
        change = np.stack([m.predict(F) for m in self.models], -1).reshape(H, N, -1)
        return (last[None] + change).transpose(1, 0, 2).astype(np.float32)


def make_peers(p: Prepared, sizes: Sizes) -> list[TorchPeer | LightGBMDirect]:
    """Every peer, untrained, sized for the prepared data (x's columns, the known inputs' width)."""
    nx = len(p.x_mean)
    nk = p.inputs(p.val)[0].shape[-1]
    return [MamKO(nx, nk, sizes), GRUSeq2Seq(nx, nk, sizes), LightGBMDirect(sizes)]
