"""Every declared entry point against the module's own signature, for every module of both FlashInfer releases.

Each op family lists its declarations in a ``DECLARATIONS`` tuple of ``(module URI pattern, Declaration)``
(the pattern is a regular expression matched against whole module URIs), for every release at once: a
declaration's ``release`` names the releases whose modules have its argument list (``"0.6.3"``, ``"0.7.2"``,
``"0.6.3, 0.7.2"``; none: every release). Here each declaration is bound to every module its pattern matches in
each of its releases (0.6.3: the session lock of the shared 0.6.3 test wheels; 0.7.2: a lock pinning the 0.7.2
test wheel alone, fixture ``release_072``) and checked the way the launcher checks it at bind time. Also: every
entry point the 0.7.2 wheel exports is declared (or listed below as unused), and a declaration of one release
offered the other release's module is refused by name. Runs on CPU: the modules load and state their signature.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import zipfile
from pathlib import Path

import pytest
from helpers.wheels import WHEELS_HINT, find_shared_wheel, find_wheels_072, shared_wheels

import fi_ffi.ops
from fi_ffi.abi import wire
from fi_ffi.errors import LoaderError
from fi_ffi.launch.kernels import entry_point
from fi_ffi.launch.launcher import bound_entry

RELEASES = ("0.6.3", "0.7.2")
# Entry points of the 0.7.2 test wheel fi_ffi does not call (new exports of 0.7: quantizing norms and RoPE, FP4
# appends, the workspace-size queries of the attention modules; their ops are not part of fi_ffi).
NOT_DECLARED_072 = frozenset(
    {
        "workspace_size",
        "rmsnorm_quant",
        "fused_add_rmsnorm_quant",
        "fused_add_rmsnorm_fp8_block_quant",
        "layernorm",
        "layernorm_quant",
        "fused_dit_layernorm",
        "fused_qk_rmsnorm_rope",
        "rope_quantize",
        "rope_quantize_append_paged_kv_cache",
        "nvfp4_quantize_append_paged_kv_cache",
        "nvfp4_quantize_append_paged_kv_cache_with_slot_mapping",
        "nvfp4_quantize_append_paged_mla_kv_cache",
    }
)


def all_declarations() -> list[tuple[str, str, wire.Declaration]]:
    """(op module, URI pattern, declaration) for every op module that declares entry points."""
    found = []
    for info in pkgutil.walk_packages(fi_ffi.ops.__path__, "fi_ffi.ops."):
        module = importlib.import_module(info.name)
        for pattern, decl in getattr(module, "DECLARATIONS", ()):
            found.append((info.name.rpartition(".")[2], pattern, decl))
    return found


def releases_of(decl: wire.Declaration) -> tuple[str, ...]:
    """The releases a declaration is for (its ``release`` tag; untagged: every release)."""
    return tuple(t.strip() for t in decl.release.split(",") if t.strip()) or RELEASES


def _listed(release: str) -> set[str] | None:
    """Module URIs in the release's test wheels, read from their zip directories (None: wheels absent)."""
    core = find_shared_wheel()
    wheels = (shared_wheels(core) if core else []) if release == "0.6.3" else find_wheels_072()
    if release == "0.6.3":
        wheels = [w for w in wheels if w not in find_wheels_072()]
    if not wheels:
        return None
    uris = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            uris |= {m.split("/")[-2] for m in zf.namelist() if m.endswith(".so") and "/jit_cache/" in m}
    return uris


DECLARED = all_declarations()
LISTED = {r: _listed(r) for r in RELEASES}
# (family, pattern, declaration, release); an untagged declaration is left out for a release whose test wheel
# has no module it matches (GDN, top-k, ... in 0.7.2)
CASES = [
    (f, p, d, r)
    for f, p, d in DECLARED
    for r in releases_of(d)
    if d.release or LISTED[r] is None or any(re.fullmatch(p, u) for u in LISTED[r] or ())
]


def _modules(request: pytest.FixtureRequest, release: str) -> list[str]:
    """The module URIs of ``release`` with its lock active (0.7.2: the lock changes for the rest of the test)."""
    return request.getfixturevalue("kernel_modules" if release == "0.6.3" else "release_072")  # type: ignore[no-any-return]


def test_every_op_family_declares_its_entry_points() -> None:
    assert {family for family, _, _ in DECLARED} >= {"norm", "prefill", "decode", "mla", "sampling"}
    for family, pattern, decl in DECLARED:
        re.compile(pattern)
        assert decl.params, f"{family}: {decl.entry} declares no parameters"
        assert set(releases_of(decl)) <= set(RELEASES), f"{family}: {decl.entry}: unknown release {decl.release!r}"


def test_every_op_launches_a_declaration_of_its_family() -> None:
    """An ``@op(launch=...)`` calls a launcher of one of its family's declarations, on a module its pattern matches:
    the declarations this test binds are the ones the ops call (fi_ffi/launch/registry.py)."""
    import sys

    from fi_ffi.launch import registry

    named = [f for f in registry.ops() if f.__module__.startswith("fi_ffi.ops.") and registry.launch_of(f) is not None]
    assert len(named) >= 30 and "rmsnorm" in {f.__name__ for f in named}
    for function in named:
        launcher = registry.launch_of(function).launcher  # type: ignore[union-attr]
        declared = getattr(sys.modules[function.__module__], "DECLARATIONS", ())
        decls = launcher.decl if isinstance(launcher.decl, tuple) else (launcher.decl,)
        for decl in decls:
            patterns = [p for p, d in declared if d is decl]
            assert patterns, f"{function.__name__}: its launcher's {decl.entry} is not in its family's DECLARATIONS"
            assert any(re.fullmatch(p, launcher.uri) for p in patterns), (function.__name__, launcher.uri, patterns)


@pytest.mark.parametrize(
    ("family", "pattern", "decl", "release"), CASES, ids=[f"{r}:{f}:{d.entry}:{p[:40]}" for f, p, d, r in CASES]
)
def test_declaration_matches_every_module_it_applies_to(
    request: pytest.FixtureRequest, family: str, pattern: str, decl: wire.Declaration, release: str
) -> None:
    modules = [uri for uri in _modules(request, release) if re.fullmatch(pattern, uri)]
    if not modules and not decl.release:
        pytest.skip(f"the {release} test wheel has no module matching {pattern!r}")
    assert modules, f"{family}: no {release} module matches {pattern!r} for {decl.entry} (declared for {decl.release})"
    without_driver = [why for why in map(_needs_a_driver, modules) if why]
    for uri in modules:
        if any(uri in why for why in without_driver):
            continue
        text = entry_point(uri, decl.entry).signature_text()
        found = wire.parse_signature(text, decl.entry)
        assert wire.signature_mismatch(decl, found) == "", f"{uri}: {text}"
        bound_entry(uri, decl)  # the launcher's own bind-time check accepts it
    if without_driver:
        pytest.skip("; ".join(without_driver))


def _needs_a_driver(uri: str) -> str:
    """Why module ``uri`` cannot be loaded here (``""`` when it loads): it lists ``libcuda.so.1`` as NEEDED and this
    machine has no driver (``mamba_selective_state_update_sm90``; tests/ops/test_mamba.py binds it in a child process
    with a driver stub), or it links cuBLAS and the ``nvidia-cublas`` wheel is not installed (``gemm``: the
    ``gemm`` extra). Any other load error is raised."""
    from fi_ffi import loader
    from fi_ffi.errors import LibraryLoadError

    try:
        loader.load_module(uri)
    except LibraryLoadError as exc:
        text = str(exc)
        if "libcuda.so.1" in text and "undefined symbol" not in text:
            return f"module {uri} needs libcuda.so.1, absent here (tests/ops/test_mamba.py binds it with a driver stub)"
        if "nvidia-cublas" in text:
            return f"module {uri} needs cuBLAS: python -m pip install '.[gemm]' ({text.splitlines()[0]})"
        raise
    return ""


def test_every_untagged_declaration_matches_a_module_of_some_release() -> None:
    if any(v is None for v in LISTED.values()):
        pytest.skip(f"needs both releases' test wheels (<repo>/../shared/wheels, wheels-072); {WHEELS_HINT}")
    if "rope" not in (LISTED["0.6.3"] or ()):  # a GPU run may stage the core wheel alone (the carry limit)
        pytest.skip(f"needs the whole 0.6.3 test set (core and extension wheels), found a part; {WHEELS_HINT}")
    for family, pattern, decl in DECLARED:
        assert any(re.fullmatch(pattern, u) for r in releases_of(decl) for u in LISTED[r] or ()), (
            f"{family}: {decl.entry}: {pattern!r} matches no module of {releases_of(decl)}"
        )


def _signatures_072() -> dict[tuple[str, str], str]:
    """(module, entry point) → signature, from ``signatures-072.txt`` beside the 0.7.2 test wheel."""
    wheels = find_wheels_072()
    path = wheels[0].parent / "signatures-072.txt" if wheels else Path("/nonexistent")
    if not path.is_file():
        pytest.skip(
            f"signatures-072.txt of the 0.7.2 test wheel is not present (<repo>/../shared/wheels-072); {WHEELS_HINT}"
        )
    found: dict[tuple[str, str], str] = {}
    uri = ""
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            uri = line[3:].split()[0]
        elif line.strip():
            entry, _, sig = line.strip().partition(": ")
            found[(uri, entry)] = sig
    return found


def test_every_entry_point_of_the_072_wheel_binds_with_its_declaration(release_072: list[str]) -> None:
    listed = _signatures_072()
    assert {uri for uri, _ in listed} == set(release_072)
    undeclared = []
    for (uri, entry), sig in sorted(listed.items()):
        decls = [d for _, p, d in DECLARED if d.entry == entry and "0.7.2" in releases_of(d) and re.fullmatch(p, uri)]
        if entry in NOT_DECLARED_072:
            assert not decls, f"{uri}.{entry} is declared: take it off NOT_DECLARED_072"
            continue
        if len(decls) != 1:
            undeclared.append(f"{uri}.{entry}: {len(decls)} declarations")
            continue
        assert decls[0].signature == sig, f"{uri}: {sig}"
        bound_entry(uri, decls[0])  # against the module's own signature, FA2 batch prefill included
    assert not undeclared, undeclared


def _release_pairs() -> list[tuple[str, str, wire.Declaration, str, wire.Declaration]]:
    """(family, 0.6.3 pattern, 0.6.3 declaration, 0.7.2 pattern, 0.7.2 declaration) of every entry point whose
    argument list (or result) changed in 0.7."""
    pairs = []
    for family, p_old, old in DECLARED:
        if releases_of(old) != ("0.6.3",):
            continue
        for family2, p_new, new in DECLARED:
            if family2 == family and new.entry == old.entry and releases_of(new) == ("0.7.2",):
                pairs.append((family, p_old, old, p_new, new))
    return pairs


PAIRS = _release_pairs()


def test_the_changed_entry_points_are_paired() -> None:
    changed = {(f, old.entry) for f, _, old, _, _ in PAIRS}
    assert changed >= {
        ("prefill", "plan"),
        ("prefill", "ragged_run"),
        ("prefill", "paged_run"),
        ("mla", "plan"),
        ("mla", "run"),
        ("sampling", "sampling_from_probs"),
        ("sampling", "top_k_renorm_probs"),
    }


@pytest.mark.parametrize(
    ("family", "p_old", "old", "p_new", "new"), PAIRS, ids=[f"{f}:{o.entry}:{po[:30]}" for f, po, o, _, _ in PAIRS]
)
def test_a_declaration_offered_the_other_releases_module_is_refused_by_name(
    request: pytest.FixtureRequest, family: str, p_old: str, old: wire.Declaration, p_new: str, new: wire.Declaration
) -> None:
    # 0.7.2 declaration, 0.6.3 module (session lock), then 0.6.3 declaration, 0.7.2 module (its own lock)
    for modules_release, pattern, offered in (("0.6.3", p_old, new), ("0.7.2", p_new, old)):
        modules = [u for u in _modules(request, modules_release) if re.fullmatch(pattern, u)]
        assert modules, f"no {modules_release} module matches {pattern!r}"
        for uri in modules:
            with pytest.raises(LoaderError) as info:
                bound_entry(uri, offered)
            text = str(info.value)
            assert f"module {uri!r}, entry point {offered.entry!r}" in text
            assert f"declared for FlashInfer {offered.release}" in text
            assert f"expected: {offered.signature}" in text and "found:" in text


def test_a_declaration_from_another_release_is_refused_by_name(kernel_modules: list[str]) -> None:
    # norm.rmsnorm with an extra int inserted before the scalars, as a newer release might do
    from fi_ffi.ops.norm import RMSNORM

    shifted = wire.declare("rmsnorm", [*RMSNORM.params[:3], ("extra", wire.INT), *RMSNORM.params[3:]], release="9.9")
    with pytest.raises(LoaderError) as info:
        bound_entry("norm", shifted)
    text = str(info.value)
    assert "module 'norm', entry point 'rmsnorm'" in text
    assert "expected: rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: int, 4: float, 5: bool) -> void" in text
    assert "found:    rmsnorm(0: DLTensor*, 1: DLTensor*, 2: DLTensor*, 3: float, 4: bool) -> void" in text
    assert "takes 5 arguments, the declaration 6" in text
    retyped = wire.declare("rmsnorm", [*RMSNORM.params[:3], ("eps", wire.INT), RMSNORM.params[4]])
    with pytest.raises(LoaderError, match=r"argument 3 \(eps\) is float in the module, int in the declaration"):
        bound_entry("norm", retyped)


def test_signature_parsing_handles_nested_types() -> None:
    text = (
        "Mismatched number of arguments when calling: `plan(0: DLTensor*, 1: Optional<ffi.Tensor>, "
        "2: int) -> Tuple<Array<int>, int>`. Expected 3 but got 0 arguments"
    )
    sig = wire.parse_signature(text, "plan")
    assert sig is not None
    assert sig.args == ("DLTensor*", "Optional<ffi.Tensor>", "int")
    assert sig.returns == "Tuple<Array<int>, int>"
    assert wire.parse_signature(text, "run") is None
