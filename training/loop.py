"""Stage 2 of a run: the training loop, read top to bottom like nanoGPT's train.py.

Multi-step forecast loss with a rollout curriculum, cosine learning rate, AdamW on matrices only, checkpoints
every N epochs and for the best validation forecast loss, exact resume, and a NaN/inf guard that rolls back
to the last checkpoint with a halved learning rate.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelcard.card import atomic_write
from plant.whatif import generate_pairs
from training.config import RunConfig, TrainConfig
from training.model import KoVAE, last_seen_step
from training.prepare import Prepared, disturbance_forecast, pair_tensors, tensors

MAX_NAN_RETRIES = 3


def rollout_length(cfg: RunConfig, epoch: int) -> int:
    """Curriculum: the trained rollout grows linearly from curriculum_start to the full horizon."""
    t = cfg.train
    if t.curriculum_epochs <= 0 or epoch >= t.curriculum_epochs:
        return t.horizon
    frac = epoch / t.curriculum_epochs
    return round(t.curriculum_start + frac * (t.horizon - t.curriculum_start))


def learning_rate(cfg: RunConfig, epoch: int) -> float:
    """Cosine decay from lr to min_lr over the run."""
    t = cfg.train
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * epoch / max(1, t.epochs)))


def step_weights(x_hist: torch.Tensor, x_fut: torch.Tensor, power: float) -> torch.Tensor:
    """(H,) weights of the horizon steps in the forecast loss: persistence's mean squared error at each step
    (normalised units, over the given windows, what was measured) to the power -``power``, scaled to mean 1.
    0: equal weights."""
    ref = ((x_fut - x_hist[:, -1:]) ** 2).nanmean((0, 2)).nan_to_num(1.0).clamp_min(1e-6)  # gaps: left out
    w = ref ** (-power)
    return w / w.mean()


def with_sensor_gaps(
    x_hist: torch.Tensor, u_hist: torch.Tensor, n_controls: int, share: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a batch's histories where a ``share`` of the windows lost one sensor (a measurement or a
    control, never a calendar input) for a while: 1 step to half the history, and in a third of them up to the
    last step, the case a forecast request meets most. The model learns to forecast through gaps."""
    B, L, nx = x_hist.shape
    hit = torch.rand(B, generator=gen) < share
    if not hit.any():
        return x_hist, u_hist
    x_hist, u_hist = x_hist.clone(), u_hist.clone()
    for b in torch.nonzero(hit).flatten().tolist():
        var = int(torch.randint(nx + n_controls, (1,), generator=gen))
        length = int(torch.randint(1, max(2, L // 2 + 1), (1,), generator=gen))
        at_end = torch.rand(1, generator=gen).item() < 1 / 3
        end = L if at_end else int(torch.randint(length, L + 1, (1,), generator=gen))
        target, col = (x_hist, var) if var < nx else (u_hist, var - nx)
        target[b, end - length : end, col] = float("nan")
    return x_hist, u_hist


def with_disturbance_forecasts(
    u_fut: torch.Tensor, x_fut: torch.Tensor, p: Prepared, share: float, noise: float, gen: torch.Generator
) -> torch.Tensor:
    """A copy of a batch's future known inputs where a ``share`` of the windows carry a noisy forecast of the
    disturbances (flag 1); the others keep "unknown" (0, flag 0). One model learns to use a forecast and to do
    without."""
    d = p.disturbances
    hit = torch.rand(len(u_fut), generator=gen) < share
    if not d or not hit.any():
        return u_fut
    fc = disturbance_forecast(x_fut[hit], d, noise, gen)
    known = torch.isfinite(fc)
    a = p.known_offset()
    u_fut = u_fut.clone()
    u_fut[hit, :, a : a + len(d)] = torch.where(known, fc, 0.0)
    u_fut[hit, :, a + len(d) : a + 2 * len(d)] = known.to(u_fut.dtype)
    return u_fut


def with_requests(
    u_hist: torch.Tensor, u_fut: torch.Tensor, closed: torch.Tensor, p: Prepared, t: TrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of a batch's known inputs (built with every control's and setpoint's true future: the "applied"
    request) told what plants tell, drawn per window and loop, for one model of every request:

    - a closed loop (``closed`` (B, loops)) leaves its control to the loop in ``loop_unknown_share`` of the
      windows (what a plant under control sends), its setpoint then planned or, in ``setpoint_held_share`` of
      them, held at its last value;
    - elsewhere the control's future is given, and its setpoint told in ``setpoint_share`` of the windows
      (planned or held as above), history and plan, else hidden (0, flag 0);
    - an open loop (no setpoint logged) has its control planned and no setpoint: nothing to draw.
    """
    if not p.n_setpoints:
        return u_hist, u_fut
    B, n_l = closed.shape
    n_u, n_s = len(p.u_mean), p.n_setpoints
    unknown = closed & (torch.rand(B, n_l, generator=gen) < t.loop_unknown_share)
    told = unknown | (torch.rand(B, n_l, generator=gen) < t.setpoint_share)
    held = told & (torch.rand(B, n_l, generator=gen) < t.setpoint_held_share)
    u_hist, u_fut = u_hist.clone(), u_fut.clone()
    for j, (c, sp) in enumerate(zip(p.looped, p.loop_setpoints, strict=True)):
        value, flag = n_u + n_l + sp, n_u + n_l + n_s + sp
        gone = unknown[:, j]
        u_fut[gone, :, c] = 0.0  # the loop decides it: the training mean, flag 0
        u_fut[gone, :, n_u + j] = 0.0
        hold = held[:, j]
        # Its last logged value (a plant's log may miss the history's last steps: held at the 0 there, training
        # told another value than the honest request and the service hold, ``modelcard.card.last_observed``).
        logged = torch.where(u_hist[hold, :, flag] > 0.5, u_hist[hold, :, value], torch.nan)  # (b, L)
        last = last_seen_step(logged[..., None])[:, 0, 0]  # 0 where never logged: a closed loop always was
        u_fut[hold, :, value] = u_hist[hold, last, value][:, None]
        hide = ~told[:, j]
        for u in (u_hist, u_fut):
            u[hide, :, value] = 0.0
            u[hide, :, flag] = 0.0
    # Setpoints of no loop (none on BSM1) follow the first draw of the windows' told setpoints: nothing to do.
    return u_hist, u_fut


def pair_scale(dx: torch.Tensor, floor: float = 0.05) -> torch.Tensor:
    """(outputs,) the RMS change of each output over the what-if pairs (normalised units), floored: each
    output's effect counts alike in ``pair_loss``, and one no plan moves (the influent) is held near no change."""
    return dx.pow(2).mean((0, 1)).sqrt().clamp_min(floor)


def pair_loss(model: KoVAE, batch: tuple[torch.Tensor, ...], scale: torch.Tensor) -> torch.Tensor:
    """Mean squared miss of the model's change between a pair's two plans against the plant's, per output in
    units of its ``pair_scale``: what makes what-if answers match the plant. The model's change is that of its
    deterministic forecast (as served): in training mode each plan's decoding would draw its own dropout mask,
    and the loss (each output in units of its small change) mostly taught the decoder to ignore dropout noise."""
    x_hist, u_hist, u_a, u_b, dx = batch
    was_training = model.training
    model.eval()  # no dropout: the two plans' decodings would draw two masks, which differ more than plans do
    try:
        return (((model.plan_effect(x_hist, u_hist, u_a, u_b) - dx) / scale) ** 2).mean()
    finally:
        model.train(was_training)


def combined_gradient(model: nn.Module, loss: torch.Tensor, pair_term: torch.Tensor, *, balance: bool) -> None:
    """Set each parameter's .grad to the forecast loss's gradient plus the pair term's. With ``balance``, the pair
    term's gradient first loses its component along the forecast gradient where the two oppose (PCGrad, Yu et al.
    2020, one way), then is scaled down to at most the forecast gradient's norm: the pairs' early gradients were
    10x the forecast's and set the optimiser's step sizes (validation forecast MSE at epoch 8: 0.127 balanced,
    0.132 not, both with the dropout bug ``pair_loss`` now avoids, which was most of the pairs' price)."""
    params = [q for q in model.parameters() if q.requires_grad]
    grads = []
    for term in (loss, pair_term):
        g = torch.autograd.grad(term, params, allow_unused=True)
        grads.append([torch.zeros_like(q) if gi is None else gi for q, gi in zip(params, g, strict=True)])
    g_f, g_p = grads
    if balance:
        f2 = sum((a * a).sum() for a in g_f).clamp_min(1e-12)
        dot = sum((a * b).sum() for a, b in zip(g_f, g_p, strict=True))
        if dot < 0:
            g_p = [b - dot / f2 * a for a, b in zip(g_f, g_p, strict=True)]
        p2 = sum((b * b).sum() for b in g_p)
        shrink = (f2 / p2.clamp_min(1e-12)).sqrt().clamp(max=1.0)
        g_p = [b * shrink for b in g_p]
    for q, a, b in zip(params, g_f, g_p, strict=True):
        q.grad = a + b


def evaluate_loss(
    model: KoVAE, data: tuple[torch.Tensor, ...], cfg: RunConfig, weights: torch.Tensor, batch: int = 256
) -> dict[str, float]:
    """Mean loss terms over a dataset in eval mode (posterior means, no dropout), full horizon."""
    model.eval()
    sums: dict[str, float] = {}
    n = len(data[0])
    with torch.no_grad():
        for s in range(0, n, batch):
            parts = model.losses(*(d[s : s + batch] for d in data), cfg.train, weights)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(data[0][s : s + batch])
    return {k: v / n for k, v in sums.items()}


# The settings a resumed run may change: how fast it runs and how often it checkpoints, and what only the stages
# after training read (calibration's samples, the interval width's driver, the unread train.quantiles), so none of
# them changes the weights or what the card says of how they were trained. The simulated plant's data cache
# (data.cache_dir with data.source = "bsm1") is one too: the scenarios are a function of the other data settings.
# Every other setting is compared; train.max_eval_windows is not free: it sets the validation windows that pick
# the kept epoch.
RESUME_FREE = {"data": ("workers", "executor"), "train": ("threads", "checkpoint_every", "calibration_samples")}
RESUME_FREE["train"] += ("width_driver", "quantiles")


def resume_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Each setting of a run's config (``given``, ``RunConfig.to_dict``) that differs from the checkpoint's
    (``saved``), with both values; ``RESUME_FREE`` is not compared, nor a setting only one side knows (a
    checkpoint written before it existed)."""
    free = {(section, key) for section, keys in RESUME_FREE.items() for key in keys}
    source = saved.get("data", {}).get("source")
    if source == given.get("data", {}).get("source"):
        # Where the data lie is no setting of the weights: simulated data are a function of the other data
        # settings; a plant's import is compared by content (``check_resumed_data``: its data hash), so a copied
        # run folder resumes on another machine, and an import replaced under the same path does not.
        free.add(("data", "cache_dir"))
        if source == "historian":
            free.add(("data", "catalog"))
    return [
        f"{section}.{key}: {saved[section][key]!r} in the checkpoint, {value!r} now"
        for section in ("data", "model", "train")
        for key, value in given.get(section, {}).items()
        if (section, key) not in free and key in saved.get(section, {}) and saved[section][key] != value
    ]


def check_resumed_config(saved: dict[str, Any], given: dict[str, Any]) -> None:
    """A resumed run must train what the interrupted one did, on the same data, and its card must say how the
    weights were trained: every setting but ``RESUME_FREE`` as the checkpoint has it, else refused naming each
    difference (the run's own settings are the checkpoint's, ``torch.load(...)["config"]``)."""
    differ = resume_differences(saved, given)
    if differ:
        raise TrainingFailed(
            "--resume with other settings than the run's (give the run's own, or start a new run in another "
            "--run-dir): " + "; ".join(differ)
        )


def check_resumed_data(saved: str | None, given: str) -> None:
    """A resumed run must train on the data the interrupted one did: the data hash (a plant's import: its
    manifest's, which covers its files and catalog) as the checkpoint has it (checkpoints from before it: none)."""
    if saved is not None and saved != given:
        raise TrainingFailed(
            f"--resume on other data than the run's: data hash {saved} in the checkpoint, {given} now (the import "
            "was replaced, or its catalog changed): start a new run in another --run-dir"
        )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``train``; a missing, unreadable or damaged file raises TrainingFailed naming it."""
    if not path.is_file():
        raise TrainingFailed(f"--resume: no checkpoint at {path} (the run stopped before writing it?)")
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as exc:  # a damaged pickle or zip raises any of many types (UnpicklingError, RuntimeError, ...)
        raise TrainingFailed(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}): it is damaged; start the run "
            "again in a new --run-dir (or restore the file)"
        ) from None
    if not isinstance(ck, dict) or not {"model", "opt", "epoch"} <= set(ck):
        raise TrainingFailed(f"checkpoint {path} is not a training checkpoint (python -m training.run writes them)")
    return ck


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


class TrainingFailed(RuntimeError):
    pass


def make_optimizer(model: KoVAE, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays only weight matrices (as nanoGPT does).

    Decay on the operator's spectrum parameters would pull every radius towards rho_max / 2 and every angle
    towards 0, a bias against the slow modes the plant has; biases, norms and noise scales are not weights either.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr)


def train(
    cfg: RunConfig,
    p: Prepared,
    run_dir: Path,
    *,
    resume: bool = False,
    inject_nan_at: list[int] | None = None,
    stop_after: int | None = None,
) -> tuple[KoVAE, list[dict[str, float]]]:
    """The training loop. Checkpoints every N epochs and the best on validation; ``resume`` continues exactly.

    A non-finite loss rolls back to the last good checkpoint and halves the learning rate (up to 3 times).
    Test hooks: ``inject_nan_at`` lists epochs whose first batch is made NaN (each entry fires once);
    ``stop_after`` ends the session after that epoch as if the process had been killed.
    """
    inject = list(inject_nan_at or [])
    t = cfg.train
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    # Training windows carry every control's and setpoint's future (what each window is told is drawn per batch,
    # with_requests); validation is told what a plant can send (the honest request), which picks the epoch.
    train_data, val_data = tensors(p, p.train, request="applied"), tensors(p, p.val, request="honest")
    closed = torch.from_numpy(p.closed_loops(p.train))
    # As wide as its known inputs, which start with the plan: controls, loop flags and setpoint columns.
    model = KoVAE(len(p.output_names), train_data[1].shape[-1], cfg.model, p.plan)
    weights = step_weights(train_data[0], train_data[2], t.step_weight_power)
    # What-if pairs of the training scenarios (data.whatif_every_hours; simulated once, then cached).
    pairs = pair_tensors(p, generate_pairs(cfg.data, p.split_ids["train"], t.history)) if t.pair_weight else None
    scale = pair_scale(pairs[-1]) if pairs else None
    opt = make_optimizer(model, t)
    ckpt_dir = run_dir / "checkpoints"
    last_ckpt, best_ckpt = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    log_path = run_dir / "log.csv"
    state = {"epoch": 0, "best_val": math.inf, "lr_scale": 1.0, "nan_retries": 0, "log": []}
    gen = torch.Generator().manual_seed(t.seed)

    def snapshot() -> dict[str, Any]:
        return {
            **state,
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": cfg.to_dict(),
            "data_hash": p.data_hash,
        }

    def restore(ck: dict[str, Any]) -> None:
        try:  # e.g. a catalog edited under the same path: other variables, other widths
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        except (RuntimeError, ValueError, KeyError) as exc:
            why = str(exc).splitlines()[0][:300]
            raise TrainingFailed(f"checkpoint {last_ckpt} does not fit this run's model ({why})") from None
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        state.update({k: ck[k] for k in ("epoch", "best_val", "lr_scale", "nan_retries", "log")})

    if resume:
        ck = read_checkpoint(last_ckpt)
        check_resumed_config(ck.get("config", {}), cfg.to_dict())
        check_resumed_data(ck.get("data_hash"), p.data_hash)
        restore(ck)
        print(f"resumed from {last_ckpt} at epoch {state['epoch']}", file=sys.stderr)
    else:
        save_checkpoint(last_ckpt, snapshot())

    n = len(train_data[0])
    while state["epoch"] < t.epochs:
        epoch = state["epoch"]
        lr = learning_rate(cfg, epoch) * state["lr_scale"]
        for g in opt.param_groups:
            g["lr"] = lr
        R = rollout_length(cfg, epoch)
        model.train()
        start, total, seen, bad, pair_total = time.perf_counter(), 0.0, 0, False, 0.0
        order = torch.randperm(n, generator=gen)
        n_batches = math.ceil(n / t.batch_size)
        for b in range(n_batches):
            idx = order[b * t.batch_size : (b + 1) * t.batch_size]
            xh, uh, xf, uf = (d[idx] for d in train_data)
            uh, uf = with_requests(uh, uf, closed[idx], p, t, gen)
            xh, uh = with_sensor_gaps(xh, uh, len(p.catalog.controls), t.gap_share, gen)
            uf = with_disturbance_forecasts(uf, xf, p, t.forecast_share, t.forecast_noise, gen)
            loss = model.losses(xh, uh, xf[:, :R], uf[:, :R], t, weights)["total"]
            pair_term = None
            if pairs is not None and scale is not None:
                pick = torch.randint(len(pairs[0]), (t.pair_batch,), generator=gen)
                pl = pair_loss(model, tuple(d[pick] for d in pairs), scale)
                pair_term = t.pair_weight * pl
                pair_total += pl.item() * len(idx)
            if b == 0 and epoch in inject:
                inject.remove(epoch)
                loss = loss * float("nan")
            if not torch.isfinite(loss) or (pair_term is not None and not torch.isfinite(pair_term)):
                bad = True
                break
            opt.zero_grad(set_to_none=True)
            if pair_term is None:
                loss.backward()
            else:
                combined_gradient(model, loss, pair_term, balance=t.pair_balance)
                loss = loss + pair_term
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            _progress(epoch, b + 1, n_batches, total / max(seen, 1))
        if bad:
            state["nan_retries"] += 1
            if state["nan_retries"] > MAX_NAN_RETRIES:
                raise TrainingFailed(
                    f"loss became NaN/inf {state['nan_retries']} times (last at epoch {epoch}); "
                    "lower train.lr or check the data"
                )
            retries, scale = state["nan_retries"], state["lr_scale"] / 2
            restore(torch.load(last_ckpt, weights_only=False))
            state.update(nan_retries=retries, lr_scale=scale)
            print(
                f"\nnon-finite loss at epoch {epoch}: rolled back to epoch {state['epoch']}, "
                f"learning rate x{scale:g} (retry {retries}/{MAX_NAN_RETRIES})",
                file=sys.stderr,
            )
            continue
        val = evaluate_loss(model, val_data, cfg, weights)
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "val_loss": val["total"],
            "val_forecast_mse": val["pred"],
            "val_rec_mse": val["rec"],
            "pair_loss": pair_total / max(seen, 1),  # 0: no what-if pairs
            "rollout": R,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        state["log"].append(row)
        state["epoch"] = epoch + 1
        print(
            f"\repoch {row['epoch']:3d}/{t.epochs} train {row['train_loss']:.4f} val {row['val_loss']:.4f} "
            f"forecast {row['val_forecast_mse']:.4f} rollout {R} lr {lr:.2e} {row['seconds']:.1f}s",
            file=sys.stderr,
        )
        _write_log(log_path, state["log"])
        if val["pred"] < state["best_val"]:
            state["best_val"] = val["pred"]
            save_checkpoint(best_ckpt, snapshot())
        if state["epoch"] % t.checkpoint_every == 0 or state["epoch"] == t.epochs:
            save_checkpoint(last_ckpt, snapshot())
        if stop_after is not None and state["epoch"] >= stop_after:
            break
    best = torch.load(best_ckpt, weights_only=False)
    model.load_state_dict(best["model"])
    model.eval()
    return model, state["log"]


def _progress(epoch: int, done: int, total: int, loss: float) -> None:
    if sys.stderr.isatty():
        bar = "#" * int(30 * done / total)
        print(f"\repoch {epoch + 1:3d} [{bar:<30}] {done}/{total} loss {loss:.4f}", end="", file=sys.stderr)


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue().encode())
