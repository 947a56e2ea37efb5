"""What fi_ffi checks before anything reaches a GPU, on any machine (no GPU, no kernel wheel, no network needed).

Descriptors (``fi_ffi.Tensor.from_pointer``) only describe memory: making them touches nothing. Every op checks
its arguments against the entry point's declaration (rank, shape, dtype, device, alignment, NULL, overlap,
scalars, stream) before it looks for a kernel module, so a wrong call is an exception naming the argument, what
was expected and what came, on a laptop as on the GPU machine. This example makes a few wrong rmsnorm calls
and prints what each one is told; then it prints which kernel wheels the lock would use here
(``fi_ffi.loader.selection``; nothing is fetched).

    python examples/argument_checks_cpu.py        # exits 0 when every bad call was refused by name

Needs: fi_ffi installed (``python -m pip install .``). Runs on a CPU-only machine.
"""

from __future__ import annotations

import sys

import fi_ffi

ROWS, HIDDEN = 4, 128
# Made-up device addresses: nothing is read or written, the calls stop at the checks. 256-byte aligned, as a
# CUDA allocator hands them out.
X, W, OUT = 0x7F00_0000_0000, 0x7F00_0010_0000, 0x7F00_0020_0000


def describe(ptr: int, shape: tuple[int, ...], dtype: str = "float16", device: int | str = 0) -> fi_ffi.Tensor:
    return fi_ffi.Tensor.from_pointer(ptr, shape, dtype, device=device)


def main() -> int:
    x, w, out = describe(X, (ROWS, HIDDEN)), describe(W, (HIDDEN,)), describe(OUT, (ROWS, HIDDEN))
    bad_calls = {
        "weight of the wrong length": lambda: fi_ffi.rmsnorm(x, describe(W, (HIDDEN // 2,)), out=out),
        "weight of another dtype": lambda: fi_ffi.rmsnorm(x, describe(W, (HIDDEN,), "bfloat16"), out=out),
        "output on the host": lambda: fi_ffi.rmsnorm(x, w, out=describe(OUT, (ROWS, HIDDEN), device="cpu")),
        "misaligned input": lambda: fi_ffi.rmsnorm(x.rebind(X + 2), w, out=out),
        "NULL output": lambda: fi_ffi.rmsnorm(x, w, out=out.rebind(0)),
        "eps that is not a number": lambda: fi_ffi.rmsnorm(x, w, out=out, eps="1e-6"),  # type: ignore[arg-type]
        "negative stream handle": lambda: fi_ffi.rmsnorm(x, w, out=out, stream=-1),
    }
    refused = 0
    for what, call in bad_calls.items():
        try:
            call()
        except (ValueError, TypeError) as exc:  # fi_ffi's argument errors
            refused += 1
            print(f"{what:26s} -> {type(exc).__name__}: {exc}")
        except fi_ffi.FiFFIError as exc:  # reached the loader: a check is missing
            print(f"{what:26s} -> NOT refused by the checks ({type(exc).__name__}: {str(exc)[:100]})")
    print(f"\n{refused} of {len(bad_calls)} bad calls refused before any kernel was looked for")

    from fi_ffi import loader

    try:
        chosen = loader.selection()
        print(f"kernel wheels for this machine: {chosen.reason}")
        for pin in chosen.kernels:
            print(f"  {pin.filename}")
    except fi_ffi.FiFFIError as exc:  # no CUDA runtime found, a bad lock: said, not raised
        print(f"kernel wheels: not selected here ({exc})")
    return 0 if refused == len(bad_calls) else 1


if __name__ == "__main__":
    sys.exit(main())
