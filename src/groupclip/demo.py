"""``groupclip demo``: differentially private training of a small CNN on scikit-learn's bundled digits.

The demo trains the same model, with the same optimizer, schedule and Poisson-sampled batches, three ways:
at the target epsilon (the main run), without privacy (the baseline), and at a few other epsilons (the
privacy-utility sweep). It prints a report and writes ``results.json`` and ``privacy_utility.png`` to ``--out``.
Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import groupclip
from groupclip.cli import UsageError
from groupclip.data import PoissonDataLoader

CLIPPINGS = ("automatic", "autov", "abadi", "psac")
GROUPS = ("all-layer", "layer-wise", "param-wise")
DEFAULT_EPSILON = 3.0
DEFAULT_SWEEP = (0.5, 1.0, 3.0, 8.0)
DEFAULT_OUT = "groupclip-demo"
TEST_SIZE = 360  # of the 1797 digits; 1437 remain for training
__all__ = ["Recipe", "RunResult", "add_arguments", "load_digits_split", "make_model", "run", "train"]

SPLIT_SEED = 0  # the train/test split is fixed; --seed changes initialisation, sampling and noise


@dataclass(frozen=True)
class Recipe:
    """How every model in the demo is trained (DP runs and the non-private baseline alike)."""

    epochs: int = 30
    batch_size: int = 128  # expected (Poisson) batch size
    lr: float = 0.02  # Adam, cosine-decayed per epoch
    max_grad_norm: float = 1.0
    clipping: str = "automatic"
    groups: str = "all-layer"
    seed: int = 0


@dataclass
class Digits:
    train: TensorDataset
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class RunResult:
    """One trained model: its test accuracy and, for a DP run, what the accountant says."""

    target_epsilon: float | None  # None: non-private
    test_accuracy: float
    train_seconds: float
    final_loss: float
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    steps: int = 0
    sample_rate: float = 0.0


# ------------------------------------------------------------------------------------------------ data, model
def load_digits_split() -> Digits:
    """sklearn's 8x8 digits, split 1437/360 (stratified, fixed seed), standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    mean, std = x_tr.mean(), x_tr.std()

    def images(a):
        return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)

    return Digits(TensorDataset(images(x_tr), torch.tensor(y_tr)), images(x_te), torch.tensor(y_te))


def make_model() -> nn.Module:
    """A small CNN: two Conv2d + GroupNorm + ReLU + max-pool blocks and a linear head (6.2k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


# ------------------------------------------------------------------------------------------------ training
def train(data: Digits, recipe: Recipe, target_epsilon: float | None, label: str, progress: bool = True) -> RunResult:
    """Train a fresh model with ``recipe``: DP at ``target_epsilon``, or non-private when it is None.

    Both kinds use Poisson-sampled batches with the same rate, the same initialisation and the same optimizer;
    the DP run adds per-sample clipping and noise through :class:`groupclip.PrivacyEngine`.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    n = len(data.train)
    engine = None
    if target_epsilon is None:
        loader = PoissonDataLoader(data.train, recipe.batch_size / n,
                                   generator=torch.Generator().manual_seed(recipe.seed))
        planned_steps = recipe.epochs * len(loader)
    else:
        engine = groupclip.PrivacyEngine(
            model, optimizer, batch_size=recipe.batch_size, sample_size=n, epochs=recipe.epochs,
            target_epsilon=target_epsilon, max_grad_norm=recipe.max_grad_norm, clipping=recipe.clipping,
            groups=recipe.groups, seed=recipe.seed)
        loader = engine.data_loader(data.train)  # created once: each epoch continues the same random stream
        planned_steps = engine.planned_steps

    loss_fn = nn.CrossEntropyLoss()
    steps, loss = 0, math.nan
    eps_text = "0" if engine is not None else "inf"
    for epoch in range(recipe.epochs):
        for group in optimizer.param_groups:  # cosine decay, one value per epoch
            group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * epoch / recipe.epochs))
        epoch_steps = min(len(loader), planned_steps - steps)  # never more steps than sigma was calibrated for
        bar = tqdm(total=epoch_steps, desc=f"{label} epoch {epoch + 1}/{recipe.epochs}", unit="step",
                   leave=epoch == recipe.epochs - 1, file=sys.stderr, disable=not progress, dynamic_ncols=True)
        loss_sum, seen = 0.0, 0
        for x, y in itertools.islice(loader, epoch_steps):
            optimizer.zero_grad()
            if len(y):  # an empty Poisson batch: no forward/backward, but the (noise-only) step still happens
                batch_loss = loss_fn(model(x), y)
                batch_loss.backward()
                loss_sum, seen = loss_sum + batch_loss.item() * len(y), seen + len(y)
            optimizer.step()
            steps += 1
            loss = loss_sum / max(seen, 1)
            bar.set_postfix_str(f"loss={loss:.3f} eps={eps_text}", refresh=False)
            bar.update()
        if engine is not None and progress:
            eps_text = f"{engine.epsilon():.2f}"  # once per epoch: the PLD accountant takes ~0.1-0.5 s
            bar.set_postfix_str(f"loss={loss:.3f} eps={eps_text}")
        bar.close()

    result = RunResult(target_epsilon, accuracy(model, data.x_test, data.y_test), 0.0, loss, steps=steps,
                       sample_rate=recipe.batch_size / n)
    if engine is not None:
        result.epsilon, result.delta, result.noise_multiplier = engine.epsilon(), engine.delta, engine.noise_multiplier
        result.steps, result.sample_rate = engine.steps, engine.sample_rate
        engine.detach()
    result.train_seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------ command line
def _epsilon(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"epsilon must be a number, got {text!r}") from None
    if value == math.inf:
        raise argparse.ArgumentTypeError("epsilon must be finite (the non-private baseline, epsilon = inf, is always "
                                         "trained)")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0, got {text}")
    return value


def _sweep(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    return tuple(_epsilon(part) for part in text.split(",") if part.strip())


def _epochs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options on its subcommand parser."""
    r = Recipe()
    parser.description = (
        "Train a small CNN with differential privacy on scikit-learn's bundled 8x8 digits (1437 train / 360 "
        "test; nothing is downloaded), with Poisson sampling and per-sample clipping, next to a non-private "
        "baseline trained the same way. Prints epsilon, delta, sigma, steps, sample rate, wall time and both test "
        "accuracies; writes results.json and privacy_utility.png (accuracy against epsilon) to --out."
    )
    parser.add_argument("--epsilon", type=_epsilon, default=DEFAULT_EPSILON, metavar="EPS",
                        help=f"target epsilon of the main DP run, > 0 (default {DEFAULT_EPSILON:g}); delta is "
                        "min(1e-5, 1/(10 N))")
    parser.add_argument("--epochs", type=_epochs, default=r.epochs, help=f"training epochs, every run (default "
                        f"{r.epochs})")
    parser.add_argument("--clipping", choices=CLIPPINGS, default=r.clipping,
                        help=f"per-sample clipping function (default {r.clipping}: AUTO-S, no threshold to tune)")
    parser.add_argument("--groups", choices=GROUPS, default=r.groups,
                        help=f"clipping groups: one norm for all parameters, one per layer or one per tensor "
                        f"(default {r.groups})")
    parser.add_argument("--seed", type=int, default=r.seed,
                        help=f"seed of initialisation, sampling and noise (default {r.seed}); the split is fixed")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder for results.json and privacy_utility.png (default ./{DEFAULT_OUT}/)")
    parser.add_argument("--sweep", type=_sweep, default=DEFAULT_SWEEP, metavar="EPS,...",
                        help="comma-separated epsilons for the privacy-utility plot, or 'none' (default "
                        f"{','.join(f'{e:g}' for e in DEFAULT_SWEEP)}; the main run and the baseline are reused)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to the output folder {str(out)!r}: {err.strerror or err}") from None


def _fmt_eps(e: float | None) -> str:
    return "inf" if e is None else f"{e:g}"


def _plot(path: Path, sweep: list[RunResult], baseline: RunResult, main: RunResult, recipe: Recipe) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.target_epsilon for r in sweep]
    ys = [100 * r.test_accuracy for r in sweep]
    x_inf = (max(xs) if xs else 1.0) * 4  # where ∞ (the non-private baseline) sits on the log axis
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"DP ({recipe.clipping} clipping, {recipe.groups})")
    ax.plot([x_inf], [100 * baseline.test_accuracy], "s", color="black", label="non-private (ε = ∞)")
    ax.axhline(100 * baseline.test_accuracy, color="gray", ls="--", lw=0.8)
    ax.plot([main.target_epsilon], [100 * main.test_accuracy], "o", ms=12, mfc="none", color="tab:red",
            label=f"main run (ε = {main.target_epsilon:g})")
    for x, y in [*zip(xs, ys, strict=True), (x_inf, 100 * baseline.test_accuracy)]:
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xscale("log")
    ticks = [*xs, x_inf]
    ax.set_xticks(ticks, [*(f"{x:g}" for x in xs), "∞"])
    ax.minorticks_off()
    ax.set_xlabel(f"ε  (δ = {main.delta:.0e}, Poisson sampling, PLD accountant)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(min([*ys, 100 * baseline.test_accuracy]) - 8, 100)
    ax.set_title(f"groupclip demo: sklearn digits, small CNN, {recipe.epochs} epochs, seed {recipe.seed}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The ``groupclip demo`` command; returns the exit code."""
    out = Path(args.out)
    _check_writable(out)
    for module in ("sklearn", "matplotlib"):
        try:
            __import__(module)
        except ModuleNotFoundError:
            raise UsageError(f"the demo needs {module}: pip install 'groupclip[demo]'") from None
    recipe = Recipe(epochs=args.epochs, clipping=args.clipping, groups=args.groups, seed=args.seed)
    progress = getattr(args, "progress", True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 6k-parameter model: intra-op threads cost more than they save
    try:
        return _run(args, out, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, out: Path, recipe: Recipe, progress: bool) -> int:
    start = time.perf_counter()
    data = load_digits_split()
    n_train, n_test = len(data.train), len(data.y_test)
    print(f"groupclip demo: sklearn digits, {n_train} train / {n_test} test 8x8 images, small CNN "
          f"({sum(p.numel() for p in make_model().parameters()):,} parameters)", flush=True)
    print(f"  Adam lr {recipe.lr:g} (cosine), {recipe.epochs} epochs, Poisson batches of expected size "
          f"{recipe.batch_size}, clipping={recipe.clipping}, groups={recipe.groups}, C={recipe.max_grad_norm:g}, "
          f"seed={recipe.seed}", flush=True)

    main = train(data, recipe, args.epsilon, f"DP eps={args.epsilon:g}", progress)
    baseline = train(data, recipe, None, "non-private", progress)
    sweep = {main.target_epsilon: main}
    for eps in sorted(set(args.sweep) - {args.epsilon}):
        sweep[eps] = train(data, recipe, eps, f"sweep eps={eps:g}", progress)
    sweep_runs = [sweep[e] for e in sorted(sweep)]
    wall = time.perf_counter() - start
    ratio = main.test_accuracy / baseline.test_accuracy if baseline.test_accuracy else math.nan

    results: dict[str, Any] = {
        "dataset": {"name": "sklearn digits", "train": n_train, "test": n_test, "split_seed": SPLIT_SEED},
        "model": "Conv2d(1,16)+GroupNorm+ReLU+MaxPool, Conv2d(16,32)+GroupNorm+ReLU+MaxPool, Linear(128,10)",
        "recipe": {**asdict(recipe), "optimizer": "Adam, cosine lr decay per epoch", "sampling": "Poisson",
                   "accountant": "pld"},
        "dp": asdict(main),
        "non_private": {"test_accuracy": baseline.test_accuracy, "train_seconds": baseline.train_seconds,
                        "final_loss": baseline.final_loss, "steps": baseline.steps},
        "accuracy_ratio": ratio,
        "sweep": [{"target_epsilon": r.target_epsilon, "epsilon": r.epsilon, "noise_multiplier": r.noise_multiplier,
                   "test_accuracy": r.test_accuracy} for r in sweep_runs]
        + [{"target_epsilon": None, "epsilon": None, "noise_multiplier": 0.0, "test_accuracy": baseline.test_accuracy}],
        "wall_seconds": wall,
        "versions": {"groupclip": groupclip.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
    }
    results_path, plot_path = out / "results.json", out / "privacy_utility.png"
    try:
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        _plot(plot_path, sweep_runs, baseline, main, recipe)
    except OSError as err:
        raise UsageError(f"cannot write to the output folder {str(out)!r}: {err.strerror or err}") from None

    print()
    print("groupclip demo report")
    print(f"  privacy      epsilon = {main.epsilon:.3f} (target {main.target_epsilon:g}), delta = {main.delta:.3g} "
          "(PLD accountant)")
    print(f"  noise        sigma = {main.noise_multiplier:.4g} (noise std / C), C = {recipe.max_grad_norm:g}, "
          f"clipping = {recipe.clipping}, groups = {recipe.groups}")
    print(f"  sampling     Poisson, sample rate q = {main.sample_rate:.4f} (expected batch {recipe.batch_size} of "
          f"{n_train}), {main.steps} steps")
    print(f"  accuracy     DP {100 * main.test_accuracy:.1f}%   non-private baseline "
          f"{100 * baseline.test_accuracy:.1f}%   (DP / baseline = {100 * ratio:.1f}%)")
    print(f"  wall time    {wall:.1f} s (DP run {main.train_seconds:.1f} s incl. noise calibration, baseline "
          f"{baseline.train_seconds:.1f} s)")
    print("  sweep        " + "   ".join(f"eps {_fmt_eps(r.target_epsilon)}: {100 * r.test_accuracy:.1f}%"
                                        for r in [*sweep_runs, baseline]))
    print(f"  files        {results_path}, {plot_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from groupclip.cli import main as _main

    sys.exit(_main(["demo", *sys.argv[1:]]))
