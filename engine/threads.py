"""How many CPU threads torch may use: one setting for ``serve``, ``worker`` and ``generate``.

torch defaults to one OpenMP thread per core. On a CPU that other work shares (two streams' codec
threads, a second worker, a CI job), those threads spin-wait on each other and a 64² demo frame goes
from ~20 ms to over half a second. One thread is the default because it was fastest in every
condition measured (``docs/benchmarks.md``, "CPU threads"); a large model on a dedicated many-core
CPU can ask for more. On a GPU the setting only affects the little work left on the CPU.
"""

from __future__ import annotations

#: ``--threads`` / ``DITSTREAM_THREADS`` when neither is given.
DEFAULT_THREADS = 1
ENV_VAR = "DITSTREAM_THREADS"


def set_torch_threads(threads: int | None) -> int:
    """Apply ``threads`` (``None`` = the default, 0 = torch's own default of one per core); returns the count."""
    import torch

    n = DEFAULT_THREADS if threads is None else threads
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()
