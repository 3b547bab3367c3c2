"""SAM-family step cost relative to SGD, and a real training run of each method on digits.

Part 1, step cost. Per-step wall time of SGD, SAM, BSAM, AUSAM, vSAM and
``optax.contrib.sam`` on one model and one batch where the gradient dominates: the digits
MLP of :mod:`benchmarks.digits` widened to ``64 → 512 → 512 → 10`` (Flax NNX, ≈300 k
parameters), batch 512 drawn from the digits training set (quick mode: the small training
model of part 2 itself, timed with the very compiled steps it trains with; dispatch-bound,
so its ratios are not judged). Each method's whole training step (the caller's gradient,
the optimizer update and ``apply_updates``) is one jitted function; it is called once to
compile, then timed in rounds (shuffled order, each call ``block_until_ready``), every call
right next to an SGD call, and its cost ratio is the median over the rounds of its time over
the adjacent SGD call's (see :func:`time_paired`; the ratio of plain medians is reported
too). AUSAM is timed on a state past its first epoch, so every timed step is a sampled step
(k = α B = B/2 examples); vSAM's SAM steps and its other steps are timed separately, and
vSAM is also run for a stretch of real steps after its warm-up, interleaved step by step
with SGD, to get the average cost of its mix of steps.

Part 2, training. Each method trains the small digits MLP (64 → 64 → 10, batch 64, 20
epochs, 20 % label noise, reference-style hyperparameters; see :mod:`benchmarks.digits`) and
is scored on the clean test set; total training time includes compilation.

Part 3, epoch time on two models (issue #19): :mod:`benchmarks.sam_epochs` trains SGD,
SAM, AUSAM and vSAM on the digits MLP and on a small conv net, all methods interleaved step
by step, and reports epoch time, steps/s and accuracy per phase (AUSAM's sampled epochs,
vSAM's warm-up and later epochs), with the conv-net targets. AUSAM and vSAM run everywhere
in the documented form: the jitted step takes the static phase hint (AUSAM
``full_batch``, vSAM ``sam_step``), so each step's branch runs outside ``lax.cond``.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import agsopt

from . import common, digits, sam_epochs

NAME = "sam_steps"

# Timing targets: (method key, ratio limit to the SGD step)
STEP_TARGETS = {"sam": 2.1, "bsam": 3.2, "ausam": 1.3}
OPTAX_TARGET = 1.05
VSAM_SLACK = 1.1  # vSAM's epoch average ≤ 1.1 + its fraction of SAM steps
ACCURACY_TARGET = 0.90


def _config(quick: bool) -> dict[str, Any]:
    """Quick mode times the training model itself (hidden 64, batch 64), with the very
    jitted steps it then trains with, so each method compiles once."""
    if quick:
        return {
            "hidden": 64,
            "depth": 1,
            "batch": 64,
            "bench_epochs": 5,  # = train_epochs: the timed steps are the training steps
            "vsam_warmup": None,  # 3 epochs, as in training
            "vsam_steps": 42,  # the rest of the 5 epochs
            "repeats": 30,
            "max_seconds": 2.0,
            "train_epochs": 5,
            "train_seeds": (0,),
            "train_methods": digits.METHODS,
            "diagnostics": False,
            "epochs_part": {"epochs": 4, "seeds": (0,), "defaults": False, "models": ("cnn",)},
        }
    return {
        "hidden": 512,
        "depth": 2,
        "batch": 512,
        "bench_epochs": 1000,  # the cosine lr barely moves: irrelevant to the cost
        "vsam_warmup": 100,  # the library default 2·K
        "vsam_steps": 300,
        "repeats": 200,
        "max_seconds": 60.0,
        "train_epochs": 20,
        "train_seeds": (0, 1, 2),
        "train_methods": digits.ALL_METHODS,
        "diagnostics": True,
        "epochs_part": sam_epochs.config(quick=False),
    }


# --------------------------------------------------------------------------- step cost


class StepBench:
    """Jitted steps of every method on one timing model, sharing parameters and batch."""

    def __init__(self, cfg: dict[str, Any], data: digits.DigitsData, seed: int = 0):
        self.cfg = cfg
        self.data = data
        self.n_train = data.x_train.shape[0]
        self.batch = cfg["batch"]
        self.steps_per_epoch = self.n_train // self.batch
        self.hp = digits.HParams()
        self.warmup = cfg["vsam_warmup"]
        if self.warmup is None:
            self.warmup = self.hp.vsam_warmup_epochs * self.steps_per_epoch
        self.graphdef, self.params = digits.init_model(
            seed, hidden=cfg["hidden"], depth=cfg["depth"]
        )
        self.x_all = jnp.asarray(data.x_train)
        self.y_all = jnp.asarray(data.y_train)
        rng = np.random.default_rng(seed)
        self.ids = jnp.asarray(rng.choice(self.n_train, self.batch, replace=False), jnp.int32)

    def step(self, method: str, batch: int | None = None) -> tuple[Any, Any]:
        """``(optimizer, jitted step)`` from :func:`benchmarks.digits.build` (cached)."""
        batch = self.batch if batch is None else batch
        _, opt, step = digits.build(
            method,
            steps_per_epoch=self.n_train // batch,
            epochs=self.cfg["bench_epochs"],
            num_examples=self.n_train,
            hidden=self.cfg["hidden"],
            depth=self.cfg["depth"],
            hp=self.hp,
            seed=0,
            vsam_warmup_steps=self.cfg["vsam_warmup"],
        )
        return opt, step

    def args(self, state: Any, ids: jax.Array | None = None) -> tuple[Any, ...]:
        ids = self.ids if ids is None else ids
        return (self.params, state, self.x_all, self.y_all, ids)


def _ausam_sampled_state(bench: StepBench, opt: Any, step: Any) -> Any:
    """An AUSAM state past its first epoch (every later step is a sampled step)."""
    params, state = bench.params, opt.init(bench.params)
    for _ in range(bench.steps_per_epoch):
        params, state, _ = step(params, state, bench.x_all, bench.y_all, bench.ids)
    jax.block_until_ready(state)
    assert int(state[0].count) // bench.steps_per_epoch >= 1
    return state


def _vsam_states(bench: StepBench, opt: Any) -> tuple[Any, Any]:
    """``(sam_state, other_state)``: a state in the warm-up (its next step is a SAM step)
    and one past it, inside a window whose schedule holds no SAM step."""
    state = opt.init(bench.params)
    vstate = state[0]
    other = vstate._replace(
        count=jnp.asarray(bench.warmup + 1, jnp.int32),
        schedule=jnp.zeros_like(vstate.schedule),
    )
    return state, (other, *state[1:])


def step_costs(bench: StepBench) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Median step times of every candidate (interleaved rounds), plus the steps used."""
    steps: dict[str, Any] = {}
    candidates: dict[str, tuple[Any, tuple[Any, ...]]] = {}
    for method in ("sgd", "sam", "bsam", "optax_sam"):
        opt, step = bench.step(method)
        steps[method] = (opt, step)
        candidates[method] = (step, bench.args(opt.init(bench.params)))

    # AUSAM and vSAM: the program of each phase (the static phase hint, as documented)
    opt, step = bench.step("ausam")
    steps["ausam"] = (opt, step)
    candidates["ausam"] = (
        functools.partial(step, hint=False),
        bench.args(_ausam_sampled_state(bench, opt, step)),
    )

    opt, step = bench.step("vsam")
    steps["vsam"] = (opt, step)
    sam_state, other_state = _vsam_states(bench, opt)
    candidates["vsam_other"] = (functools.partial(step, hint=False), bench.args(other_state))
    candidates["vsam_sam"] = (functools.partial(step, hint=True), bench.args(sam_state))

    if bench.cfg["diagnostics"]:
        # AUSAM's first-epoch (full-batch) step, and its ideal: SAM/SGD on k = B/2 examples
        opt, step = steps["ausam"]
        candidates["ausam_first_epoch"] = (
            functools.partial(step, hint=True),
            bench.args(opt.init(bench.params)),
        )
        half = bench.batch // 2
        half_ids = bench.ids[:half]
        for method in ("sgd", "sam"):
            opt, step = bench.step(method, batch=half)
            candidates[f"{method}_half_batch"] = (
                step,
                bench.args(opt.init(bench.params), half_ids),
            )
        candidates["optax_sam_transparent"] = _optax_transparent(bench)

    stats = time_paired(
        candidates, "sgd", repeats=bench.cfg["repeats"], max_seconds=bench.cfg["max_seconds"]
    )
    return stats, steps


def time_paired(
    candidates: dict[str, tuple[Any, tuple[Any, ...]]],
    baseline: str,
    *,
    repeats: int,
    max_seconds: float,
    min_repeats: int = 5,
) -> dict[str, dict[str, Any]]:
    """Like :func:`benchmarks.common.time_interleaved`, plus ratios to ``baseline`` paired
    call by call.

    Every candidate is called once to compile (``first_s``). Then, per round, in a shuffled
    order, each candidate is timed right next to a call of the baseline (alternately before
    and after it), and ``paired_ratio`` is the median over rounds of ``t_candidate /
    t_baseline`` of those adjacent calls. On a machine shared with other jobs the load
    changes from one second to the next; adjacent calls see about the same load, so the
    paired ratio is far steadier than a ratio of two medians taken over the whole run (also
    reported, as ``median_ratio``). Each call is ``block_until_ready``; compile excluded.
    """
    first = {name: common.time_call(fn, *args) for name, (fn, args) in candidates.items()}
    base_fn, base_args = candidates[baseline]
    others = [name for name in candidates if name != baseline]
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    ratios: dict[str, list[float]] = {name: [] for name in others}
    order_rng = np.random.default_rng(0)
    start = time.perf_counter()
    for round_index in range(repeats):
        for i in order_rng.permutation(len(others)):
            name = others[i]
            fn, args = candidates[name]
            if (round_index + i) % 2 == 0:
                t_base = common.time_call(base_fn, *base_args)
                t = common.time_call(fn, *args)
            else:
                t = common.time_call(fn, *args)
                t_base = common.time_call(base_fn, *base_args)
            samples[name].append(t)
            samples[baseline].append(t_base)
            ratios[name].append(t / t_base)
        if round_index + 1 >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    base_median = float(np.median(samples[baseline]))
    stats = {}
    for name, times in samples.items():
        paired = np.asarray(ratios[name]) if name != baseline else np.ones(1)
        stats[name] = {
            **common.timing_stats(times, first[name]),
            "paired_ratio": float(np.median(paired)),
            "paired_ratio_q25": float(np.percentile(paired, 25)),
            "paired_ratio_q75": float(np.percentile(paired, 75)),
            "median_ratio": float(np.median(times)) / base_median,
        }
    return stats


def _optax_transparent(bench: StepBench) -> tuple[Any, tuple[Any, ...]]:
    """``optax.contrib.sam`` in its default (transparent) mode: a SAM step is two jitted
    calls, each with the caller's gradient (ascent call, then descent call)."""
    import optax

    hp = bench.hp
    base = optax.chain(
        optax.add_decayed_weights(hp.weight_decay), optax.sgd(hp.lr, momentum=hp.momentum)
    )
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(hp.rho))
    opt = optax.contrib.sam(base, adversary, sync_period=2)
    _, loss_fn = digits.make_losses(bench.graphdef)

    @jax.jit
    def call(params, state, x_all, y_all, ids):
        grads = jax.grad(loss_fn)(params, x_all[ids], y_all[ids])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def sam_step(params, state, x_all, y_all, ids):
        params, state = call(params, state, x_all, y_all, ids)  # ascent
        return call(params, state, x_all, y_all, ids)  # descent (back to the cache)

    return sam_step, bench.args(opt.init(bench.params))


def vsam_epoch(bench: StepBench, steps: dict[str, Any]) -> dict[str, Any]:
    """vSAM over real steps after its warm-up, interleaved step by step with SGD.

    Both train from the same initialization on the same sequence of random batches;
    the vSAM state is advanced through its warm-up first (untimed).
    """
    cfg = bench.cfg
    warmup, n_steps = bench.warmup, cfg["vsam_steps"]
    opt_v, step_v = steps["vsam"]
    opt_s, step_s = steps["sgd"]
    rng = np.random.default_rng(1)
    batches = [
        jnp.asarray(rng.choice(bench.n_train, bench.batch, replace=False), jnp.int32)
        for _ in range(warmup + n_steps)
    ]
    x_all, y_all = bench.x_all, bench.y_all
    p_v, s_v = bench.params, opt_v.init(bench.params)
    p_s, s_s = bench.params, opt_s.init(bench.params)
    for ids in batches[:warmup]:
        p_v, s_v, _ = step_v(p_v, s_v, x_all, y_all, ids, hint=True)
        p_s, s_s, _ = step_s(p_s, s_s, x_all, y_all, ids)
    jax.block_until_ready((p_v, s_v, p_s, s_s))
    assert int(s_v[0].num_sam_steps) == warmup

    t_v, t_s, flags = [], [], []
    for i, ids in enumerate(batches[warmup:]):
        order = ("sgd", "vsam") if i % 2 == 0 else ("vsam", "sgd")
        for which in order:
            t0 = time.perf_counter()
            if which == "sgd":
                p_s, s_s, _ = jax.block_until_ready(step_s(p_s, s_s, x_all, y_all, ids))
                t_s.append(time.perf_counter() - t0)
            else:  # the documented loop: the host picks the program from the state
                hint = agsopt.sharpness.vsam_sam_step_hint(s_v[0], warmup_steps=warmup)
                p_v, s_v, _ = jax.block_until_ready(step_v(p_v, s_v, x_all, y_all, ids, hint=hint))
                t_v.append(time.perf_counter() - t0)
                flags.append(bool(s_v[0].last_was_sam))
    t_v, t_s, flags = np.asarray(t_v), np.asarray(t_s), np.asarray(flags)
    frac = float(flags.mean())
    paired = t_v / t_s  # each vSAM step against the SGD step on the same batch, adjacent
    r_sam = float(np.median(paired[flags])) if flags.any() else 0.0
    r_other = float(np.median(paired[~flags]))
    return {
        "steps": int(n_steps),
        "warmup_steps": int(warmup),
        "window": int(bench.hp.vsam_window),
        "sam_steps": int(flags.sum()),
        "sam_fraction": frac,
        "paired_mix_ratio": frac * r_sam + (1 - frac) * r_other,
        "paired_ratio_sam_steps": r_sam if flags.any() else None,
        "paired_ratio_other_steps": r_other,
        "mean_ratio": float(t_v.mean() / t_s.mean()),
        "sgd_mean_ms": 1e3 * float(t_s.mean()),
        "sgd_median_ms": 1e3 * float(np.median(t_s)),
        "vsam_mean_ms": 1e3 * float(t_v.mean()),
        "vsam_sam_median_ms": 1e3 * float(np.median(t_v[flags])) if flags.any() else None,
        "vsam_other_median_ms": 1e3 * float(np.median(t_v[~flags])),
        "final_base_sr": float(s_v[0].base_sr),
    }


# --------------------------------------------------------------------------- training


def training(cfg: dict[str, Any], data: digits.DigitsData) -> list[dict[str, Any]]:
    rows = []
    for method in cfg["train_methods"]:
        results = [
            digits.train(method, seed=seed, epochs=cfg["train_epochs"], data=data)
            for seed in cfg["train_seeds"]
        ]
        acc = np.asarray([r.test_accuracy for r in results])
        frac = [r.sam_fraction for r in results if r.sam_fraction is not None]
        frac_after = [
            r.sam_fraction_after_warmup for r in results if r.sam_fraction_after_warmup is not None
        ]
        rows.append(
            {
                "method": digits.LABELS[method],
                "key": method,
                "test acc (seed 0)": float(acc[0]),
                "test acc mean": float(acc.mean()),
                "test acc min": float(acc.min()),
                "total s": float(np.mean([r.total_s for r in results])),
                "compile s": float(np.mean([r.compile_s for r in results])),
                "steps s": float(np.mean([r.steps_s for r in results])),
                "median step ms": 1e3 * float(np.mean([r.median_step_s for r in results])),
                "SAM fraction": float(np.mean(frac)) if frac else None,
                "SAM fraction after warm-up": float(np.mean(frac_after)) if frac_after else None,
                "seeds": [int(s) for s in cfg["train_seeds"]],
                "test acc per seed": acc.tolist(),
                "runs": [r.summary() for r in results],
            }
        )
    return rows


# --------------------------------------------------------------------------- report


def run(quick: bool, out_dir: Path | None = None) -> dict[str, Any]:
    """Run the benchmark; with ``out_dir``, also write ``sam_steps.json`` and ``.md`` there."""
    start = time.perf_counter()
    env = common.environment()
    cfg = _config(quick)
    data = digits.load_data()
    bench = StepBench(cfg, data)
    stats, steps = step_costs(bench)
    epoch = vsam_epoch(bench, steps)
    train_rows = training(cfg, data)
    model_epochs = sam_epochs.run_models(cfg["epochs_part"], data)
    epoch_tables, epoch_targets = sam_epochs.tables_and_targets(
        model_epochs, cfg["epochs_part"], judged=not quick
    )

    labels = {
        "sgd": "SGD",
        "sam": "agsopt.sam",
        "bsam": "agsopt.bsam",
        "ausam": "agsopt.ausam (sampled step, α = 0.5)",
        "vsam_other": "agsopt.vsam, other (non-SAM) step",
        "vsam_sam": "agsopt.vsam, SAM step",
        "optax_sam": "optax.contrib.sam (opaque, sync_period=2): one call = one SAM step",
        "ausam_first_epoch": "agsopt.ausam, first-epoch (full-batch) step",
        "sgd_half_batch": "SGD on B/2 examples (diagnostic)",
        "sam_half_batch": "agsopt.sam on B/2 examples (diagnostic: AUSAM's ideal)",
        "optax_sam_transparent": "optax.contrib.sam (transparent): two jitted calls per SAM step",
    }
    step_rows = []
    for key, s in stats.items():
        step_rows.append(
            {
                "step": labels[key],
                "key": key,
                "median ms": 1e3 * s["median_s"],
                "IQR ms": f"{1e3 * s['q25_s']:.3g}–{1e3 * s['q75_s']:.3g}",
                "× SGD (paired)": s["paired_ratio"],
                "paired IQR": f"{s['paired_ratio_q25']:.3g}–{s['paired_ratio_q75']:.3g}",
                "× SGD (medians)": s["median_ratio"],
                "target": f"≤ {STEP_TARGETS[key]}" if key in STEP_TARGETS else None,
                "repeats": s["repeats"],
                "first call s": s["first_s"],
                "stats": s,
            }
        )
    ratio = {key: stats[key]["paired_ratio"] for key in stats}
    sam_vs_optax = ratio["sam"] / ratio["optax_sam"]
    vsam_limit = VSAM_SLACK + epoch["sam_fraction"]
    vsam_predicted = (
        epoch["sam_fraction"] * ratio["vsam_sam"]
        + (1 - epoch["sam_fraction"]) * ratio["vsam_other"]
    )
    epoch["predicted_ratio"] = vsam_predicted

    def judged(met: bool) -> bool | None:
        return None if quick else bool(met)

    quick_note = " (quick mode: small model, not judged)" if quick else ""
    targets = [
        common.target(
            f"{labels[key]} ≤ {limit}× an SGD step",
            judged(ratio[key] <= limit),
            f"{ratio[key]:.2f}×{quick_note}",
        )
        for key, limit in STEP_TARGETS.items()
    ]
    targets.append(
        common.target(
            f"agsopt.vsam averaged over {epoch['steps']} steps after its warm-up ≤ "
            f"{VSAM_SLACK} + its fraction of SAM steps",
            judged(epoch["paired_mix_ratio"] <= vsam_limit),
            f"{epoch['paired_mix_ratio']:.3f}× (limit {vsam_limit:.3f}; SAM fraction "
            f"{epoch['sam_fraction']:.3f}; ratio of mean step times "
            f"{epoch['mean_ratio']:.3f}; non-SAM step alone {ratio['vsam_other']:.3f}×)"
            f"{quick_note}",
        )
    )
    targets.append(
        common.target(
            f"agsopt.sam no slower than optax.contrib.sam (ratio ≤ {OPTAX_TARGET})",
            judged(sam_vs_optax <= OPTAX_TARGET),
            f"{sam_vs_optax:.3f}{quick_note}",
        )
    )
    accs = {row["key"]: row["test acc min"] for row in train_rows}
    targets.append(
        common.target(
            f"every method reaches test accuracy ≥ {ACCURACY_TARGET} on noisy digits",
            all(a >= ACCURACY_TARGET for a in accs.values()),
            ", ".join(f"{digits.LABELS[k]} {a:.3f}" for k, a in accs.items())
            + (" (min over seeds)" if len(cfg["train_seeds"]) > 1 else ""),
        )
    )

    targets += epoch_targets

    epoch_row = {
        "steps": epoch["steps"],
        "SAM steps": epoch["sam_steps"],
        "SAM fraction": epoch["sam_fraction"],
        "× SGD (paired mix)": epoch["paired_mix_ratio"],
        "× SGD (mean times)": epoch["mean_ratio"],
        "× SGD (from step table)": vsam_predicted,
        "limit": vsam_limit,
        "vSAM mean ms": epoch["vsam_mean_ms"],
        "SGD mean ms": epoch["sgd_mean_ms"],
        **epoch,
    }
    n_params = sum(x.size for x in jax.tree.leaves(bench.params))
    model = (
        f"Flax NNX MLP 64 → {cfg['hidden']} ×{cfg['depth']} → 10 ({n_params:,} parameters), "
        f"batch {cfg['batch']} of the digits training set, float32, {jax.devices()[0].platform}"
    )
    tables = [
        common.make_table(
            "Per-step wall time relative to an SGD step",
            [
                "step",
                "median ms",
                "IQR ms",
                "× SGD (paired)",
                "paired IQR",
                "× SGD (medians)",
                "target",
                "repeats",
                "first call s",
            ],
            step_rows,
            [
                f"Model: {model}. Every step is one jitted call: the caller's gradient, the "
                "optimizer update (SGD momentum 0.9, weight decay 1e-3, cosine lr) and "
                "apply_updates; compile excluded (first call), block_until_ready.",
                "× SGD (paired) — the number the targets use — is the median over rounds of "
                "t_step / t_SGD for an SGD call made right next to it (rounds in shuffled "
                "order, SGD alternately before and after); × SGD (medians) = median step / "
                "median SGD over the whole run. On this shared machine the load moves from "
                "second to second, and adjacent calls see the same load; see time_paired.",
                "AUSAM is timed on a state past its first epoch: every timed step samples "
                f"k = {bench.batch // 2} of {bench.batch} examples and runs both SAM passes "
                "on them only (no caller gradient: AUSAM computes its own).",
                "vSAM: 'SAM step' is a state in its warm-up, timed with the sam_step=True "
                "program; 'other step' a state past it in a window without SAM steps "
                "(caller's gradient + PSF reuse; the default program, whose lax.cond skips "
                "the second gradient). AUSAM's steps run the program of their phase "
                "(full_batch=False sampled, True first epoch).",
                "optax.contrib.sam in opaque mode with sync_period=2 runs the ascent inside "
                "update: one update call = caller's gradient + one adversarial step + "
                "grad_fn at w + ρĝ + the outer (descent) update — the same two gradients "
                "as one agsopt.sam step, so it is compared call for call. Only the "
                "transparent (default) mode needs two update calls per SAM step.",
            ],
        ),
        common.make_table(
            f"vSAM over {epoch['steps']} real steps after its warm-up, interleaved with SGD",
            [
                "steps",
                "SAM steps",
                "SAM fraction",
                "× SGD (paired mix)",
                "× SGD (mean times)",
                "× SGD (from step table)",
                "limit",
                "vSAM mean ms",
                "SGD mean ms",
            ],
            [epoch_row],
            [
                f"vSAM with window K = {epoch['window']}, warm-up {epoch['warmup_steps']} "
                "steps (all SAM, untimed), reference control settings; random batches of "
                f"{cfg['batch']} from the digits training set; SGD trains alongside on the "
                "same batches, and each vSAM step is timed right next to the SGD step on "
                "the same batch (alternately before and after), each block_until_ready.",
                "× SGD (paired mix) — the target — = f·r_SAM + (1 − f)·r_other, f the "
                "fraction of SAM steps in this stretch and r the median of the paired "
                "ratios t_vSAM / t_SGD over its SAM steps and over its other steps; "
                "× SGD (mean times) = Σ t_vSAM / Σ t_SGD (raw, sensitive to load bursts); "
                "× SGD (from step table) = f·(SAM step) + (1 − f)·(other step) from the "
                "table above.",
                "base_sr starts at 1 and grows by at most ×1.26 per window (a1 = a2 = "
                "0.13, changes clipped to ±1), so in the first windows after the warm-up "
                "f ≈ 1/K.",
            ],
        ),
        *epoch_tables,
        common.make_table(
            "Training on digits with 20 % label noise (clean test set)",
            [
                "method",
                "test acc (seed 0)",
                "test acc mean",
                "test acc min",
                "total s",
                "compile s",
                "steps s",
                "median step ms",
                "SAM fraction",
                "SAM fraction after warm-up",
            ],
            train_rows,
            [
                "Model: Flax NNX MLP 64 → 64 → 10, batch 64 (21 steps per epoch), "
                f"{cfg['train_epochs']} epochs, seeds {list(cfg['train_seeds'])} "
                "(initialization, shuffling, optimizer keys); split 1347/450 and label noise "
                "with data seed 0. Hyperparameters: benchmarks/digits.py.",
                "total s = wall time of the training loop including compilation (the first "
                "step, 'compile s'); steps s = the other steps. Times are means over seeds. "
                "At this size a step is dispatch-bound (≈0.1 ms), so the step cost ratios "
                "are measured on the larger model above, not here.",
                *(
                    [
                        "Quick mode: the training steps were compiled (and timed) in the "
                        "step-cost part, so 'compile s' here is ≈ 0."
                    ]
                    if quick
                    else []
                ),
            ],
        ),
    ]
    notes = [
        f"Timing model: {model}.",
        "The machine is shared: the load average is recorded in the environment line; the "
        "interleaved rounds make bursts of load hit all methods alike.",
    ]
    report = common.make_report(
        NAME,
        "SAM-family step cost and digits training",
        __doc__.strip(),
        tables=tables,
        notes=notes,
        targets=targets,
        data={
            "config": {k: v for k, v in cfg.items()},
            "ratios": ratio,
            "sam_vs_optax": sam_vs_optax,
            "vsam_epoch": epoch,
            "model": model,
            "epochs_part": model_epochs,
        },
    )
    if out_dir is not None:
        mode = "quick" if quick else "full"
        common.write_report(report, Path(out_dir), env, mode, time.perf_counter() - start)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sam_steps", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, ~20 s (CI)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = run(args.quick, args.out)
    print(f"{NAME}: {time.perf_counter() - start:.1f} s -> {args.out}")
    for t in report["targets"]:
        print(f"  [{common.target_mark(t['met'])}] {t['target']}: {t['detail']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
