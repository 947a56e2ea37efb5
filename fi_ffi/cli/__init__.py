"""The ``fi-ffi`` command (also ``python -m fi_ffi``): one module per subcommand, each declaring its command as
data (``COMMAND``, a :class:`.arguments.Subcommand`), :func:`main` in :mod:`.main`.

- ``doctor [--json]`` (:mod:`.doctor`): driver, CUDA runtime (and a ``FI_FFI_CUDA_VERSION`` override), GPUs and
  whether the selected kernel wheels cover each one's architecture, glibc, the ``FI_FFI_*`` variables set, the
  lock (which file each section came from) and where each selected wheel would come from, the TVM-FFI runtime,
  the cache path, and the kernel modules on disk that reference symbols nothing provides. Exit 0 on any machine.
- ``fetch [--wheel PATH ...] [--all]`` (:mod:`.fetch`): fill the cache from the lock (wheelhouse, download) or
  from local wheels.
- ``cache {path,list,verify [--full],clear}`` (:mod:`.cache`): inspect and repair the cache.
- ``lock WHEEL... [--kind kernel|runtime]`` (:mod:`.lock`): print a lock pinning local wheels (for
  ``FI_FFI_LOCK``).
- ``list [--kind K] [--dtype D] [--head-dim N]`` (:mod:`.listing`): the attention variants the active lock
  provides, with the FlashInfer release each comes from (``--json``: also the symbols each module on disk
  references that nothing provides).
- ``smoke [--device N]`` (:mod:`.smoke_command`; the checks: :mod:`.smoke`): run each op once on the GPU against
  a reference; without a GPU, say so, print the doctor summary and exit 1.
- ``generate ...`` (:mod:`.generate`): the old spelling of ``fi-engine generate`` (the engine's own command), run
  in a child process with the same arguments after a deprecation line on stderr; exits with its status.
- ``launch --nproc N [--master-addr A] [--master-port P] -- cmd ...`` (:mod:`.launch`): start N ranks of ``cmd``
  on this host with the torchrun variables and NVLink multicast off (:mod:`fi_ffi.comm.launch`); exits with the
  worst rank's status.

Exit status (:mod:`.output`): 0 success; 1 a check failed (``smoke``, ``cache verify``, ``list`` matching
nothing); 2 a usage error or an fi_ffi error (message on stderr, no traceback); 130 interrupted; 141 the output's
reader closed the pipe (``fi-ffi list | head``).
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
