"""Compress a text with a trained run and print the compressed text.

Examples::

    python -m experiments.compress --run runs/quickstart --mask_rate 0.4 notes.txt
    cat notes.txt | python -m experiments.compress --run runs/quickstart --target_tokens 200 --json
    python -m experiments.compress --run runs/quickstart --mask-rate 0.6 --reconstruct --force_keep "Python" -- notes.txt
    python -m experiments.compress --run runs/quickstart --mask_rate 0.4 --placeholder "…" notes.txt   # mark each dropped run
    python -m experiments.compress --run runs/quickstart --reconstruct --force_keep Python --force_keep "pip install" notes.txt
    python -m experiments.compress --run runs/quickstart --units word notes.txt

The input is a UTF-8 file (undecodable bytes are replaced, not fatal) or, with no file or ``-``, standard
input. ``--json`` prints the result's fields (text, ids, kept mask, token counts, requested and achieved
mask rate); ``--reconstruct`` also prints the reconstructor's fill-in. ``--force_keep STRING`` takes one
string and may be repeated. ``--units`` chooses what is dropped or kept together (``piece``: whole
characters; ``word``: whole words; default: :data:`~tokencompress_env.compressor.DEFAULT_UNITS`). When
force-kept tokens leave fewer tokens removable than asked, a ``warning:`` line on standard error says so
(and ``--json`` has it as ``warning``). User errors print one line on standard error and exit with code 2,
before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from experiments.config import cli_main
from tokencompress_env.errors import InputError
from tokencompress_env.reconstructor import resolve_device
from tokencompress_env.units import UNIT_KINDS


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line :class:`InputError` (exit 2 through ``cli_main``)."""

    def error(self, message: str) -> typing.NoReturn:
        """Raise instead of printing the usage.

        :param message: argparse's message
        """
        raise InputError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options.

    :return: the parser
    """
    parser = _Parser(prog="python -m experiments.compress", description=__doc__.split("\n\n")[0] if __doc__ else "", allow_abbrev=False)
    parser.add_argument("input", nargs="?", default="-", help="text file to compress (default or '-': standard input)")
    parser.add_argument("--run", required=True, help="a run folder written by experiments.train_ppo")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--mask_rate", "--mask-rate", type=float, default=None, help="fraction of tokens to remove, in [0, 1) (default 0.4)")
    group.add_argument("--target_tokens", "--target-tokens", type=int, default=None, help="tokens to keep instead of a mask rate")
    parser.add_argument(
        "--force_keep",
        "--force-keep",
        action="append",
        default=[],
        metavar="STRING",
        help="a string kept verbatim wherever it occurs; repeat the option for several strings",
    )
    parser.add_argument("--units", choices=UNIT_KINDS, default=None, help="drop whole characters (piece) or whole words (word)")
    parser.add_argument("--keep_digits", "--keep-digits", action="store_true", default=None, help="keep every token with a digit")
    parser.add_argument(
        "--placeholder", default=None, metavar="STRING", help="mark each run of dropped tokens with STRING in the output (e.g. '…')"
    )
    parser.add_argument("--json", action="store_true", help="print the result fields as JSON")
    parser.add_argument("--reconstruct", action="store_true", help="also print the reconstructor's fill-in")
    parser.add_argument("--reference", action="store_true", help="reconstruct with the frozen reference reconstructor")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    parser.add_argument(
        "--matmul_dtype",
        "--matmul-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the policy's matrix products: float32 (default, exact) or bfloat16 (faster on CPUs with AVX512-BF16/AMX, a few drops differ)",
    )
    return parser


def read_input(source: str) -> str:
    """Read the text to compress from a file or standard input, replacing invalid UTF-8.

    :param source: a path, or ``-`` for standard input
    :return: the text
    """
    if source == "-":
        return sys.stdin.buffer.read().decode("utf-8", errors="replace")
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"input file '{source}' does not exist (or is not a file): pass a text file, or '-' for standard input")
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read input file '{source}': {exc.strerror}") from None


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m experiments.compress``.

    :param argv: command-line arguments (default ``sys.argv[1:]``)
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if callable(reconfigure):
        reconfigure(errors="replace")  # a text with replacement characters must print on any terminal
    if args.reference and not args.reconstruct:
        raise InputError("--reference chooses the reconstructor of --reconstruct: add --reconstruct")
    resolve_device(args.device)
    text = read_input(args.input)
    if not text.strip():
        raise InputError("the input text is empty or only whitespace: give some text to compress")
    from tokencompress_env.compressor import Compressor

    compressor = Compressor.load(args.run, device=args.device, matmul_dtype=args.matmul_dtype)
    result = compressor.compress(
        text,
        mask_rate=args.mask_rate,
        target_tokens=args.target_tokens,
        force_keep=args.force_keep,
        keep_digits=args.keep_digits,
        placeholder=args.placeholder,
        units=args.units,
    )
    assert not isinstance(result, list)
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    reconstruction = compressor.reconstruct(result, reference=args.reference) if args.reconstruct else None
    if args.json:
        out = result.to_dict()
        if reconstruction is not None:
            out["reconstruction"] = reconstruction
            out["reconstructor"] = "reference" if args.reference else "joint"
        print(json.dumps(out, ensure_ascii=False))
        return
    print(result.text)
    if reconstruction is not None:
        print(f"--- reconstruction ({'reference' if args.reference else 'joint'} reconstructor) ---")
        print(reconstruction)


if __name__ == "__main__":
    sys.exit(main(None))
