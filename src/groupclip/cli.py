"""The ``groupclip`` command: ``groupclip epsilon ...`` (privacy accounting) and ``groupclip demo ...``."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Sequence
from types import ModuleType

from groupclip import accounting

PROG = "groupclip"

# Subcommands implemented in other modules, imported only when asked for: name -> (module, help).
_PLUGINS: dict[str, tuple[str, str]] = {
    "demo": ("groupclip.demo", "train a small model with differential privacy and report accuracy and epsilon"),
}


class UsageError(Exception):
    """A user error: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _add_epsilon(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "epsilon",
        help="epsilon spent for a noise multiplier, or the noise multiplier for a target epsilon",
        description="Poisson-subsampled Gaussian mechanism accounting (RDP and PLD, via dp-accounting). Give "
        "--noise-multiplier to get epsilon, or --epsilon to get the smallest noise multiplier reaching it; "
        "give either --sample-rate and --steps, or --batch-size, --sample-size and --epochs.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--noise-multiplier", type=float, help="sigma: noise std / clipping norm")
    what.add_argument("--epsilon", type=float, help="target epsilon (prints the calibrated sigma)")
    p.add_argument("--sample-rate", type=float, help="q: probability that an example joins a batch")
    p.add_argument("--steps", type=_positive_int, help="number of training steps")
    p.add_argument("--batch-size", type=_positive_int, help="expected batch size B (q = B / N)")
    p.add_argument("--sample-size", type=_positive_int, help="dataset size N")
    p.add_argument("--epochs", type=float, help="epochs E (steps = ceil(E * round(1/q)), as the engine counts)")
    p.add_argument("--delta", type=float, help="delta (default with --sample-size: min(1e-5, 1/(10 N)))")
    p.add_argument("--method", choices=["rdp", "pld", "both"], default="both", help="accountant (default both)")
    p.set_defaults(func=_run_epsilon)


def _rate_and_steps(args: argparse.Namespace) -> tuple[float, int]:
    by_rate = args.sample_rate is not None or args.steps is not None
    by_epochs = args.batch_size is not None or args.epochs is not None
    if by_rate and by_epochs:
        raise UsageError("give either --sample-rate/--steps or --batch-size/--sample-size/--epochs, not both")
    if by_epochs:
        if args.batch_size is None or args.sample_size is None or args.epochs is None:
            raise UsageError("--batch-size, --sample-size and --epochs must be given together")
        if args.batch_size > args.sample_size:
            raise UsageError(f"--batch-size ({args.batch_size}) exceeds --sample-size ({args.sample_size})")
        if not 0 < args.epochs < math.inf:
            raise UsageError(f"--epochs must be positive, got {args.epochs:g}")
        q = args.batch_size / args.sample_size
        return q, accounting.steps_for_epochs(args.epochs, q)
    if args.sample_rate is None or args.steps is None:
        raise UsageError("give --sample-rate and --steps (or --batch-size, --sample-size and --epochs)")
    return args.sample_rate, args.steps


def _run_epsilon(args: argparse.Namespace) -> int:
    q, steps = _rate_and_steps(args)
    delta = args.delta
    if delta is None:
        if args.sample_size is None:
            raise UsageError("--delta is required (or give --sample-size to use the default delta)")
        delta = accounting.default_delta(args.sample_size)
    methods = ["rdp", "pld"] if args.method == "both" else [args.method]
    settings = f"sample_rate={q:.6g}  steps={steps}  delta={delta:.3g}"
    if args.noise_multiplier is not None:
        settings += f"  noise_multiplier={args.noise_multiplier:g}"
        rows = [(m, accounting.epsilon(noise_multiplier=args.noise_multiplier, sample_rate=q, steps=steps,
                                       delta=delta, method=m)) for m in methods]
        header = "epsilon"
    else:
        settings += f"  target epsilon={args.epsilon:g}"
        rows = [(m, accounting.noise_multiplier(epsilon=args.epsilon, delta=delta, sample_rate=q, steps=steps,
                                                method=m)) for m in methods]
        header = "noise_multiplier"
    print(settings)
    print(f"{'method':<8}{header}")
    for method, value in rows:
        print(f"{method:<8}{value:.6g}")
    return 0


def _load_plugin(name: str) -> ModuleType | str:
    """The plugin module, or why it cannot be loaded."""
    module_name = _PLUGINS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return f"the '{name}' command is not available in this installation ({module_name} is missing)"
        return f"the '{name}' command needs the package '{err.name}' (pip install 'groupclip[demo]')"


def _add_plugin(subparsers: argparse._SubParsersAction, name: str, load: bool) -> None:
    p = subparsers.add_parser(name, help=_PLUGINS[name][1])
    module = _load_plugin(name) if load else None
    if isinstance(module, ModuleType):
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    else:
        def unavailable(args: argparse.Namespace, why: str | None = module) -> int:
            raise UsageError(why or f"the '{name}' command is not available")

        p.set_defaults(func=unavailable, accepts_any_arguments=True)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; plugin modules are imported only when their command is in ``argv``."""
    parser = _Parser(prog=PROG, description="Differentially private training for PyTorch models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_epsilon(subparsers)
    for name in _PLUGINS:
        _add_plugin(subparsers, name, load=name in argv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, unknown = build_parser(argv).parse_known_args(argv)
        if unknown and not getattr(args, "accepts_any_arguments", False):
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        return int(args.func(args) or 0)
    except (UsageError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
