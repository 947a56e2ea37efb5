"""The ``FI_FFI_*`` environment variables: one table (name, kind, choices, default, meaning) and its readers.

Every variable fi_ffi reads is a row of :data:`VARIABLES`, and every read goes through :func:`raw` (or a reader
built on it: :func:`flag`, :func:`seconds`, :func:`choice`), which refuses a name that is not a row; so ``fi-ffi
doctor`` (:func:`problems`), the configuration table in ``docs/operations.md`` and the readers cannot drift apart
(``tests/package/test_variables.py`` greps the package for reads outside this module and fails on any).

Values are read at call time (never cached across a change) with surrounding blanks removed. A value fi_ffi would
refuse is refused by its reader with the text :func:`problem` gives (naming the variable, what is expected and the
fix); the reader raises its own unit's error type (the loader's :class:`~fi_ffi.errors.LoaderError`, ``ValueError``
in ``fi_ffi.comm``), so that one variable's bad value reads the same wherever it is met.

Kinds: ``flag`` (``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``, any case; another value is
refused, never silently off), ``seconds`` (a finite number; ``> 0`` or ``>= 0`` as the row says), ``choice`` (one
of ``choices``), ``runtime`` (``auto``, ``package``, ``lock`` or the path of a ``libtvm_ffi.so``), ``version``
(``major.minor``), ``archs`` (comma-separated GPU archs), ``file``, ``folder``, ``folders`` (``os.pathsep``
-separated), ``wheels`` (a folder of wheels, or one wheel file).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Variable:
    """One ``FI_FFI_*`` variable.

    Attributes:
        name: ``FI_FFI_...``.
        kind: how its value is read (see the module doc).
        default: what unset means, in words (a flag's: ``"0"`` or ``"1"``).
        meaning: what it does, one sentence.
        reader: the unit that reads it: ``loader``, ``comm`` or ``tests`` (the test suite, tests/).
        choices: a ``choice``'s values.
        positive: a ``seconds`` value must be > 0 (else >= 0).
    """

    name: str
    kind: str
    default: str
    meaning: str
    reader: str = "loader"
    choices: tuple[str, ...] = ()
    positive: bool = False


_ROWS = (
    Variable("FI_FFI_CACHE_DIR", "folder", "platformdirs' user cache dir for fi_ffi", "the cache folder"),
    Variable(
        "FI_FFI_LOCK",
        "file",
        "the packaged wheels.lock",
        "a lock file replacing the packaged one (a section it lacks, [[kernel]] or [[runtime]], comes from the "
        "packaged one)",
    ),
    Variable(
        "FI_FFI_WHEELHOUSE",
        "folders",
        "none",
        "folders of wheels looked at before any download; matched by file name, sha256-verified, used in place",
    ),
    Variable(
        "FI_FFI_OFFLINE", "flag", "0", "never touch the network; a missing wheel is an error saying how to get one"
    ),
    Variable("FI_FFI_QUIET", "flag", "0", "no progress bars and no fi_ffi: progress lines on stderr"),
    Variable(
        "FI_FFI_LOCK_TIMEOUT",
        "seconds",
        "wait without a limit",
        "seconds to wait for a cache lock another process holds before failing with an error naming it",
    ),
    Variable(
        "FI_FFI_TRUST_INSTALLED",
        "flag",
        "0",
        "use a pip-installed flashinfer-jit-cache matching a pin by name, version and tags even when nothing ties "
        "it to the pinned sha256",
    ),
    Variable(
        "FI_FFI_USE_INSTALLED",
        "flag",
        "1",
        "use pip-installed kernel distributions in place (0: always the pinned wheel; the test suite sets 0)",
    ),
    Variable(
        "FI_FFI_CUDA_VERSION",
        "version",
        "asked from libcudart",
        "the CUDA version to select wheels for; its major is the libcudart loaded (default: the lock's kernel wheels')",
    ),
    Variable(
        "FI_FFI_SM",
        "archs",
        "every entry",
        "GPU archs (90a,100a): keep only kernel entries built for one of them (entries without an sm list are kept)",
    ),
    Variable(
        "FI_FFI_RUNTIME",
        "runtime",
        "auto",
        "where libtvm_ffi.so comes from: auto, package, lock or the path of a libtvm_ffi.so",
    ),
    Variable(
        "FI_FFI_NCCL_BACKEND",
        "choice",
        "the first that loads",
        "the NCCL binding of fi_ffi.comm",
        reader="comm",
        choices=("nccl4py", "cupy"),
    ),
    Variable(
        "FI_FFI_RENDEZVOUS_TIMEOUT",
        "seconds",
        "300",
        "seconds a rank waits for the others at start-up",
        reader="comm",
        positive=True,
    ),
    Variable("FI_FFI_RUN_GPU_TESTS", "flag", "0", "run the GPU tests (needs a GPU and torch)", reader="tests"),
    Variable(
        "FI_FFI_TEST_WHEELS",
        "wheels",
        "<repo>/../shared/wheels",
        "the core test kernel wheel: a folder holding flashinfer_jit_cache-*.whl, or one such wheel (FlashInfer's "
        "prebuilt flashinfer-jit-cache wheel included)",
        reader="tests",
    ),
    Variable(
        "FI_FFI_TEST_WHEELS_072", "folder", "<repo>/../shared/wheels-072", "the 0.7.2 test wheels", reader="tests"
    ),
    Variable(
        "FI_FFI_TEST_WHEELS_CU12", "folder", "<repo>/../shared/wheels-cu12", "the CUDA 12 test wheel", reader="tests"
    ),
    Variable("FI_FFI_TEST_WHEELS_FP8", "folder", "<repo>/../shared/wheels-fp8", "the FP8 test wheel", reader="tests"),
    Variable(
        "FI_FFI_TEST_WHEELS_COMM", "folder", "<repo>/../shared/wheels-comm", "the comm test wheel", reader="tests"
    ),
    Variable(
        "FI_FFI_TEST_WHEELS_MODELS",
        "folder",
        "<repo>/../shared/wheels-models",
        "the model-family test wheel",
        reader="tests",
    ),
    Variable(
        "FI_FFI_TEST_RELEASE",
        "choice",
        "0.6.3",
        "the FlashInfer release whose test modules the session lock prefers",
        reader="tests",
        choices=("0.6.3", "0.7.2"),
    ),
    Variable(
        "FI_FFI_TEST_ALLOW_NETWORK", "flag", "0", "let tests that need the network run (pip, PyPI)", reader="tests"
    ),
)
VARIABLES: dict[str, Variable] = {v.name: v for v in _ROWS}
"""Every ``FI_FFI_*`` variable fi_ffi and its test suite read, by name."""


def raw(name: str) -> str:
    """The value of variable ``name`` with surrounding blanks removed, ``""`` when unset.

    Raises:
        KeyError: ``name`` is not a row of :data:`VARIABLES` (a reader added without its row: add the row).
    """
    if name not in VARIABLES:
        raise KeyError(f"{name} is not in fi_ffi.variables.VARIABLES; add its row there")
    return os.environ.get(name, "").strip()


def is_set(name: str) -> bool:
    """Whether variable ``name`` is in the environment (even empty)."""
    raw(name)
    return name in os.environ


def problem(name: str, value: str | None = None) -> str:
    """What is wrong with ``value`` (default: the current value) of variable ``name``; ``""`` when it is fine or
    unset. A name that is not a row is a likely typo, said so."""
    var = VARIABLES.get(name)
    if var is None:
        close = [n for n in VARIABLES if _near(n, name)]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"{name}: not a variable fi_ffi reads, a typo?{hint}"
    text = (os.environ.get(name, "") if value is None else value).strip()
    if not text:
        return ""
    shown = f"{name}={text!r}"
    kind = var.kind
    if kind == "flag" and text.lower() not in TRUE | FALSE:
        return f"{shown}: expected 1 (or true/yes/on) to turn it on, 0 (or false/no/off) or unset to turn it off"
    if kind == "seconds":
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        ok = (number > 0 if var.positive else number >= 0) and number != float("inf")
        if not ok:
            bound = "> 0" if var.positive else ">= 0"
            return f"{shown}: expected a number of seconds {bound}; unset it for the default ({var.default})"
    if kind == "choice" and text not in var.choices:
        return f"{shown}: expected one of {', '.join(var.choices)} (unset: {var.default})"
    if kind == "runtime" and text not in ("auto", "package", "lock") and not os.path.isfile(os.path.expanduser(text)):
        if "/" in text or text.startswith("~") or ".so" in text:  # meant as a path: say what is wrong with it
            path = os.path.abspath(os.path.expanduser(text))
            what = "is a folder, not the library" if os.path.isdir(path) else "does not exist"
            return (
                f"{shown}: {path} {what}; set it to the path of an existing libtvm_ffi.so, or unset it (auto: "
                f"the one already loaded, the installed apache-tvm-ffi's or the lock's)"
            )
        return f"{shown}: expected auto, package, lock or the path of a libtvm_ffi.so"
    if kind == "version" and not re.fullmatch(r"\d+\.\d+", text):
        return f"{shown}: expected major.minor, such as 13.0"
    if kind == "archs":
        archs = archs_of(text)
        if not archs or any(not re.fullmatch(r"\d+[a-z]?", a) for a in archs):
            return f"{shown}: expected comma-separated GPU archs such as 90a,100a"
    if kind == "file" and not os.path.isfile(os.path.expanduser(text)):
        path = os.path.abspath(os.path.expanduser(text))
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        return f"{shown}: {path} {what}; set it to the path of an existing file, or unset it ({var.default})"
    if kind == "folder" and os.path.exists(os.path.expanduser(text)) and not os.path.isdir(os.path.expanduser(text)):
        return f"{shown}: a file, not a folder"
    if kind == "wheels" and not os.path.exists(os.path.expanduser(text)):
        return f"{shown}: no such folder or wheel"
    return ""


def _near(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.85


def flag(name: str, error: type[Exception] = ValueError) -> bool:
    """Whether on/off variable ``name`` is on (its row's default when unset or empty).

    Raises:
        error: any other value (:func:`problem`'s text): ``maybe`` must not silently mean off.
    """
    value = raw(name).lower()
    if not value:
        return VARIABLES[name].default == "1"
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise error(problem(name))


def seconds(name: str, error: type[Exception] = ValueError) -> float | None:
    """Variable ``name`` (a ``seconds`` row) as seconds, ``None`` when unset.

    Raises:
        error: not a finite number in the row's range (:func:`problem`'s text).
    """
    text = _checked(name, error)
    return float(text) if text else None


def choice(name: str, error: type[Exception] = ValueError) -> str | None:
    """Variable ``name`` (a ``choice`` row), ``None`` when unset or empty.

    Raises:
        error: not one of the row's choices (:func:`problem`'s text).
    """
    return _checked(name, error) or None


def _checked(name: str, error: type[Exception]) -> str:
    """Variable ``name``'s text ("" when unset), once :func:`problem` finds nothing wrong with it (else ``error``
    with its text)."""
    text = raw(name)
    why = problem(name) if text else ""
    if why:
        raise error(why)
    return text


def archs_of(text: str) -> tuple[str, ...]:
    """The GPU archs of an ``archs`` value (``"sm_90a, 100a"`` gives ``("90a", "100a")``)."""
    out = []
    for item in text.replace(";", ",").split(","):
        item = item.strip().lower().removeprefix("sm_").removeprefix("sm")
        if item:
            out.append(item)
    return tuple(out)


def problems() -> dict[str, str]:
    """Every set ``FI_FFI_*`` variable whose value would be refused, or that is not a variable fi_ffi reads (a
    likely typo), with what is wrong (for ``fi-ffi doctor``). Reading them never raises here."""
    out = {}
    for name in sorted(n for n in os.environ if n.startswith("FI_FFI_")):
        why = problem(name)
        if why:
            out[name] = why
    return out


__all__ = ["VARIABLES", "Variable", "archs_of", "choice", "flag", "is_set", "problem", "problems", "raw", "seconds"]
