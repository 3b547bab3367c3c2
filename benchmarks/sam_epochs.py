"""SAM-family epoch time on the digits MLP and conv net, all methods interleaved (issue #19).

Each method trains each model of :mod:`benchmarks.digits` (the MLP ``64 → 64 → 10`` and the
conv net ``conv 1 → 16, conv 16 → 32, dense → 10``; batch 64, 21 steps per epoch, 20 %
label noise, the reference-style hyperparameters of :mod:`benchmarks.digits`) from the same
initialization on the same shuffled batches (one seed drives both), and is scored on the
clean test set. AUSAM and vSAM run the training loop the docs give (one compiled program
per phase, chosen on the host by the phase hint: AUSAM ``full_batch = epoch < 1``, vSAM
``sam_step = vsam_sam_step_hint(state)``); ``AUSAM/vSAM (one program)`` run the same
methods without hints, i.e. the single ``lax.cond`` program of agsopt ≤ 0.3, for the
before/after comparison and to check that the hints leave accuracy unchanged.

Timing. Every program is compiled before the clock starts (each phase's program is called
once on a throwaway state). Then, step by step, every method takes its step on the same
batch, in an order that rotates from step to step, each step ``block_until_ready``, so a
burst of load on this shared machine hits all methods alike. A method's epoch time is the
sum of its step times in that epoch (vSAM's includes the host read of its state that picks
the program). Ratios are taken epoch by epoch against SAM (and SGD) in the same epoch of
the same run, then summarized by the median over the epochs of the phase and the seeds:
AUSAM's sampled phase (epochs ≥ 1), vSAM's warm-up (epochs 0–2) and the epochs after it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import common, digits

NAME = "sam_epochs"
METHODS = ("sgd", "sam", "ausam", "vsam")
LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "ausam": "AUSAM",
    "vsam": "vSAM",
    "ausam_default": "AUSAM (one program)",
    "vsam_default": "vSAM (one program)",
}
MODEL_LABELS = {"mlp": "MLP 64 → 64 → 10", "cnn": "conv net (2 conv layers)"}

# issue #19's targets on the conv net (ratios of epoch times in one run)
CONV_TARGETS = {
    "ausam_sampled": ("AUSAM's sampled phase ≤ {}× SAM's epoch time", 0.75),
    "vsam_after": ("vSAM after its warm-up ≤ {}× SAM's epoch time", 0.75),
    "vsam_warmup": ("vSAM's warm-up ≤ {}× SAM's epoch time", 1.1),
    "sam_vs_sgd": ("SAM ≤ {}× SGD's epoch time", 2.1),
}
ACCURACY_TOLERANCE = 0.005  # hinted loop against the one-program loop (0.5 %)


def config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"epochs": 4, "seeds": (0,), "defaults": False, "models": digits.MODELS}
    return {"epochs": 10, "seeds": (0, 1), "defaults": True, "models": digits.MODELS}


class Runner:
    """One method's training run: its parameters, state, jitted step and step times."""

    def __init__(
        self,
        method: str,
        model: str,
        seed: int,
        *,
        hints: bool,
        data: digits.DigitsData,
        epochs: int,
        batch: int,
    ):
        self.method, self.model, self.seed, self.hints = method, model, seed, hints
        self.key = method if hints or method not in ("ausam", "vsam") else f"{method}_default"
        self.hp = digits.HParams()
        n_train = data.x_train.shape[0]
        self.steps_per_epoch = n_train // batch
        self.graphdef, self.params = digits.init_model(seed, hidden=64, depth=1, model=model)
        _, self.opt, self.step = digits.build(
            method,
            steps_per_epoch=self.steps_per_epoch,
            epochs=epochs,
            num_examples=n_train,
            hidden=64,
            depth=1,
            hp=self.hp,
            seed=seed,
            model=model,
        )
        self.state = self.opt.init(self.params)
        self.times: list[list[float]] = [[] for _ in range(epochs)]
        self.sam_flags: list[bool] = []
        self.accuracy: float | None = None  # clean test accuracy, set by finish()

    def programs(self) -> tuple[bool | None, ...]:
        if self.hints and self.method in ("ausam", "vsam"):
            return (True, False)
        return (None,)

    def compile(self, x_all: jax.Array, y_all: jax.Array, ids: np.ndarray) -> None:
        """Compile every program this run uses (on a throwaway state)."""
        for hint in self.programs():
            jax.block_until_ready(
                self.step(self.params, self.opt.init(self.params), x_all, y_all, ids, hint=hint)
            )

    def take_step(self, epoch: int, x_all: jax.Array, y_all: jax.Array, ids: np.ndarray):
        t0 = time.perf_counter()
        hint = (
            digits.phase_hint(self.method, self.state, epoch, self.hp, self.steps_per_epoch)
            if self.hints
            else None
        )
        self.params, self.state, _ = jax.block_until_ready(
            self.step(self.params, self.state, x_all, y_all, ids, hint=hint)
        )
        self.times[epoch].append(time.perf_counter() - t0)
        if self.method == "vsam":
            self.sam_flags.append(bool(self.state[0].last_was_sam))

    def epoch_times(self) -> np.ndarray:
        return np.asarray([sum(t) for t in self.times])

    def finish(self, data: digits.DigitsData) -> None:
        self.accuracy = digits.accuracy(self.graphdef, self.params, data.x_test, data.y_test)


def train_interleaved(
    model: str, seed: int, cfg: dict[str, Any], data: digits.DigitsData, batch: int = 64
) -> dict[str, Runner]:
    """Every method on ``model`` and ``seed``, step by step in a rotating order."""
    epochs = cfg["epochs"]
    runners = [
        Runner(m, model, seed, hints=True, data=data, epochs=epochs, batch=batch) for m in METHODS
    ]
    if cfg["defaults"]:
        runners += [
            Runner(m, model, seed, hints=False, data=data, epochs=epochs, batch=batch)
            for m in ("ausam", "vsam")
        ]
    x_all, y_all = jax.numpy.asarray(data.x_train), jax.numpy.asarray(data.y_train)
    n_train = data.x_train.shape[0]
    steps_per_epoch = n_train // batch
    for runner in runners:
        runner.compile(x_all, y_all, np.arange(batch, dtype=np.int32))
    rng = np.random.default_rng(seed)  # the shuffling of digits.train with this seed
    for epoch in range(epochs):
        order = rng.permutation(n_train).astype(np.int32)
        for s in range(steps_per_epoch):
            ids = order[s * batch : (s + 1) * batch]
            shift = s % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                runner.take_step(epoch, x_all, y_all, ids)
    return {runner.key: runner for runner in runners}


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def summarize(runs: list[dict[str, Runner]], epochs: int, warmup_epochs: int) -> dict[str, Any]:
    """Per-phase epoch-time ratios (median over epochs and seeds) and accuracies."""
    sampled = range(digits.AUSAM_FULL_BATCH_EPOCHS, epochs)
    warmup = range(min(warmup_epochs, epochs))
    after = range(warmup_epochs, epochs)

    def ratios(key: str, base: str, phase: range) -> list[float]:
        out = []
        for run in runs:
            if key in run and base in run:
                t, b = run[key].epoch_times(), run[base].epoch_times()
                out += [float(t[e] / b[e]) for e in phase]
        return out

    keys = list(runs[0])
    summary: dict[str, Any] = {
        "sam_vs_sgd": _median(ratios("sam", "sgd", range(epochs))),
        "ausam_sampled": _median(ratios("ausam", "sam", sampled)),
        "ausam_first": _median(ratios("ausam", "sam", range(digits.AUSAM_FULL_BATCH_EPOCHS))),
        "vsam_warmup": _median(ratios("vsam", "sam", warmup)),
        "vsam_after": _median(ratios("vsam", "sam", after)),
        "ausam_default_sampled": _median(ratios("ausam_default", "sam", sampled)),
        "vsam_default_warmup": _median(ratios("vsam_default", "sam", warmup)),
        "vsam_default_after": _median(ratios("vsam_default", "sam", after)),
        "x_sgd": {k: _median(ratios(k, "sgd", range(epochs))) for k in keys},
        "x_sgd_phase": {
            "ausam_sampled": _median(ratios("ausam", "sgd", sampled)),
            "vsam_after": _median(ratios("vsam", "sgd", after)),
        },
    }
    rows = []
    for key in keys:
        times = np.stack([run[key].epoch_times() for run in runs])  # [seeds, epochs]
        accs = [run[key].accuracy for run in runs]
        steps = runs[0][key].steps_per_epoch
        later = times[:, 1:] if epochs > 1 else times
        row = {
            "method": LABELS[key],
            "key": key,
            "test acc": float(np.mean(accs)),
            "test acc per seed": accs,
            "epoch s (median, after the first)": float(np.median(later)),
            "steps/s": float(steps / np.median(later)),
            "epoch s per epoch (seed mean)": times.mean(0).tolist(),
            "× SAM (epochs, median)": _median(ratios(key, "sam", range(epochs))),
            "× SGD (epochs, median)": summary["x_sgd"][key],
        }
        if key in ("ausam", "ausam_default"):
            row["phase"] = f"sampled (epochs ≥ 1): {_median(ratios(key, 'sam', sampled)):.3f}× SAM"
        elif key in ("vsam", "vsam_default"):
            spe = runs[0][key].steps_per_epoch
            after_flags = [f for run in runs for f in run[key].sam_flags[warmup_epochs * spe :]]
            row["SAM fraction after warm-up"] = float(np.mean(after_flags)) if after_flags else None
            row["phase"] = (
                f"warm-up: {_median(ratios(key, 'sam', warmup)):.3f}× SAM; after: "
                + (f"{_median(ratios(key, 'sam', after)):.3f}× SAM" if after_flags else "—")
                + (f" (SAM fraction {np.mean(after_flags):.3f})" if after_flags else "")
            )
        rows.append(row)
    summary["rows"] = rows
    return summary


def run_models(cfg: dict[str, Any], data: digits.DigitsData) -> dict[str, dict[str, Any]]:
    """``{model: summary}`` for every model of ``cfg``."""
    warmup_epochs = digits.HParams().vsam_warmup_epochs
    out = {}
    for model in cfg["models"]:
        runs = []
        for seed in cfg["seeds"]:
            run = train_interleaved(model, seed, cfg, data)
            for runner in run.values():
                runner.finish(data)
            runs.append(run)
        out[model] = summarize(runs, cfg["epochs"], warmup_epochs)
    return out


def tables_and_targets(
    results: dict[str, dict[str, Any]], cfg: dict[str, Any], *, judged: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The report's tables (one per model) and the issue #19 targets."""
    columns = [
        "method",
        "test acc",
        "epoch s (median, after the first)",
        "steps/s",
        "× SAM (epochs, median)",
        "× SGD (epochs, median)",
        "phase",
    ]
    tables, targets = [], []
    for model, summary in results.items():
        tables.append(
            common.make_table(
                f"Epoch time on the digits {MODEL_LABELS[model]} (all methods interleaved)",
                columns,
                summary["rows"],
                [
                    f"{cfg['epochs']} epochs of 21 steps (batch 64), seeds "
                    f"{list(cfg['seeds'])}, {jax.devices()[0].platform}; compile excluded. "
                    "Ratios: epoch by epoch against SAM (SGD) in the same run, median over "
                    "epochs and seeds; 'phase' gives AUSAM's sampled epochs and vSAM's "
                    "warm-up (epochs 0–2) and later epochs separately.",
                    "AUSAM and vSAM: the documented training loop, one compiled program per "
                    "phase (the phase hints). '(one program)': the same methods without "
                    "hints, the single lax.cond program (before issue #19).",
                ],
            )
        )
    conv = results.get("cnn")
    mlp = results.get("mlp")
    note = "" if judged else " (quick mode: not judged)"
    if conv is not None:
        for key, (text, limit) in CONV_TARGETS.items():
            value = conv[key]
            extra = ""
            if key == "ausam_sampled" and conv["ausam_default_sampled"] is not None:
                extra = f"; one program: {conv['ausam_default_sampled']:.2f}×"
            if key == "vsam_after" and conv["vsam_default_after"] is not None:
                extra = f"; one program: {conv['vsam_default_after']:.2f}×"
            if key == "vsam_warmup" and conv["vsam_default_warmup"] is not None:
                extra = f"; one program: {conv['vsam_default_warmup']:.2f}×"
            targets.append(
                common.target(
                    "Conv net: " + text.format(limit),
                    (value is not None and value <= limit) if judged else None,
                    (f"{value:.3f}×" if value is not None else "not measured") + extra + note,
                )
            )
    for model, summary in results.items():
        by_key = {row["key"]: row for row in summary["rows"]}
        for method in ("ausam", "vsam"):
            default = by_key.get(f"{method}_default")
            if default is None:
                continue
            diff = abs(by_key[method]["test acc"] - default["test acc"])
            targets.append(
                common.target(
                    f"{MODEL_LABELS[model]}: {LABELS[method]}'s test accuracy with the phase "
                    f"hints within {ACCURACY_TOLERANCE:.1%} of the one-program loop",
                    diff <= ACCURACY_TOLERANCE,
                    f"{by_key[method]['test acc']:.4f} vs {default['test acc']:.4f}",
                )
            )
    if mlp is not None:
        targets.append(
            common.target(
                "MLP epoch times reported (no target here; the MLP step-cost targets are "
                "in the step table)",
                None,
                ", ".join(
                    f"{LABELS[k]} {v:.2f}× SGD" for k, v in mlp["x_sgd"].items() if v is not None
                ),
            )
        )
    return tables, targets


def run(quick: bool, out_dir: Path | None = None) -> dict[str, Any]:
    """The benchmark on its own; :mod:`benchmarks.sam_steps` includes the same tables."""
    start = time.perf_counter()
    env = common.environment()
    cfg = config(quick)
    results = run_models(cfg, digits.load_data())
    tables, targets = tables_and_targets(results, cfg, judged=not quick)
    report = common.make_report(
        NAME,
        "SAM-family epoch time on the digits MLP and conv net",
        __doc__.strip(),
        tables=tables,
        targets=targets,
        data={"config": cfg, "results": results},
    )
    if out_dir is not None:
        common.write_report(
            report, Path(out_dir), env, "quick" if quick else "full", time.perf_counter() - start
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sam_epochs", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 epochs, one seed")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "results" / "benchmarks",
        help="results folder (default: results/benchmarks/, git-ignored)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = run(args.quick, args.out)
    print(f"{NAME}: {time.perf_counter() - start:.1f} s -> {args.out}")
    for table in report["tables"]:
        print(f"\n{table['title']}\n" + common.markdown_table(table["columns"], table["rows"]))
    for t in report["targets"]:
        print(f"  [{common.target_mark(t['met'])}] {t['target']}: {t['detail']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
