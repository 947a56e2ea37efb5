"""``fi-ffi list [--kind K] [--dtype D] [--head-dim N] [--json]``: the attention variants the active lock provides,
with the FlashInfer release each comes from (``--json``: also the symbols each module on disk references that
nothing provides). A wheel that is not here is read from its URL's zip central directory, not downloaded; when
that fails, ``list`` says why, the wheel's size and what to run instead (``fi-ffi fetch``), and downloads nothing
unless ``--allow-full-download`` is given. Exit 1 when nothing matches. (Named ``listing``, not ``list``, so as
not to shadow the builtin.)
"""

from __future__ import annotations

import argparse
import sys

from . import doctor
from .arguments import Argument, Subcommand, positive_int
from .output import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, write_json

# `fi-ffi list --kind`: the variant kinds (ops.attention.variants.KINDS; a test keeps the two equal) and families.
LIST_KINDS = (
    "single_prefill",
    "batch_prefill",
    "single_decode",
    "batch_decode",
    "batch_mla",
    "prefill",
    "decode",
    "mla",
)

# Spellings of `--dtype` beyond fi_ffi.dtypes' names: the "fp" forms common in other tools' flags.
_DTYPE_ALIASES = {"fp16": "float16", "fp32": "float32", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


# The q dtypes `--dtype` takes: those FlashInfer's attention module URIs can name for the query (a test keeps these
# equal to what variants allows), so that `--dtype fp32` is a usage error, not "no variant matches".
_Q_DTYPES = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def _q_dtype(text: str) -> str:
    """argparse type of ``--dtype``: any name :func:`fi_ffi.dtypes.dtype` accepts, or an ``fp`` alias; returns
    the canonical name. A bad name is a usage error (exit 2) listing what is accepted."""
    from .. import dtypes

    name = _DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    try:
        canonical = dtypes.dtype(name).name
    except TypeError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}: use float16 (f16, fp16), bfloat16 (bf16), float8_e4m3fn (e4m3) or "
            f"float8_e5m2 (e5m2)"
        ) from None
    if canonical not in _Q_DTYPES:  # a dtype, but no attention variant's query has it (float32, int32, ...)
        raise argparse.ArgumentTypeError(
            f"{text!r} ({canonical}) is no attention variant's q dtype: use float16 (f16, fp16), bfloat16 (bf16), "
            f"float8_e4m3fn (e4m3) or float8_e5m2 (e5m2)"
        )
    return canonical


def run(args: argparse.Namespace) -> int:
    from .. import loader
    from ..ops.attention import variants

    try:
        # a wheel not here: its central directory, not 1-2 GB (a whole download only when the user allowed it)
        with loader.listing_without_download(allow_full_download=args.allow_full_download):
            rows = variants.list_variants(kind=args.kind, dtype=args.dtype, head_dim=args.head_dim)
    except (ValueError, TypeError) as exc:  # an argument the parser let through; the text names it
        print(f"fi-ffi list: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        symbols = doctor.module_symbols()
        if symbols["error"]:
            print(f"fi-ffi list: module symbols not checked: {symbols['error']}", file=sys.stderr)
        for row in rows:  # a list of names (empty: all provided), or null: the module is not on disk yet
            checked = symbols["modules"].get(row["uri"])
            row["unresolved_symbols"] = checked["unresolved"] if checked is not None else None
        write_json(rows)
    if rows and not args.json:
        table = [("KIND", "BACKEND", "DTYPES", "HEAD_DIM", "RELEASE", "MODULE")]
        for row in rows:
            dtypes = "/".join(dict.fromkeys((row["dtype_q"], row["dtype_kv"], row["dtype_o"])))
            heads = (
                f"{row['head_dim_qk']}"
                if row["head_dim_qk"] == row["head_dim_vo"]
                else f"{row['head_dim_qk']}/{row['head_dim_vo']}"
            )
            table.append((row["kind"], row["backend"], dtypes, heads, row["release"] or "-", row["uri"]))
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        for r in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    if not rows:
        print("no variant matches", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


COMMAND = Subcommand(
    name="list",
    summary="attention variants the active lock provides",
    description="List the attention variants (kind, backend, dtypes, head dims, FlashInfer release, module) of the "
    "wheels the lock selects. A wheel that is not here is read from its URL's zip central directory, not "
    "downloaded; if the server cannot serve that, list says so with the wheel's size and downloads nothing (see "
    "--allow-full-download). Exit 1 when nothing matches.",
    examples="fi-ffi list\nfi-ffi list --kind decode --dtype bf16 --head-dim 128\nfi-ffi list --json",
    arguments=(
        Argument(
            "--kind",
            choices=LIST_KINDS,
            metavar="KIND",
            help=f"one of {', '.join(LIST_KINDS)} ('prefill'/'decode': single and batch)",
        ),
        Argument(
            "--dtype",
            type=_q_dtype,
            metavar="DTYPE",
            help="q dtype: float16 (f16, fp16), bfloat16 (bf16), float8_e4m3fn (e4m3), float8_e5m2 (e5m2)",
        ),
        Argument("--head-dim", type=positive_int, metavar="N", help="head dimension (qk or vo)"),
        Argument("--json", action="store_true", help="one object per variant, with every field"),
        Argument(
            "--allow-full-download",
            action="store_true",
            help="when a wheel's listing cannot be read with range requests, download the whole wheel (1-2 GB; its "
            "size is said first) instead of stopping",
        ),
    ),
    run=run,
)


__all__ = ["COMMAND", "LIST_KINDS", "run"]
