"""emfm's benchmarks and longer experiments, each figure in docs/benchmarks.md with its command.

Not installed with emfm: run one from the repository's root as ``python -m benchmarks.NAME`` (``--help`` for
its flags). Each benchmark is one module and imports only the shared ones: :mod:`benchmarks.harness` (how a run
is timed, in which process, its peak memory, how repeats pair into ratios) and :mod:`benchmarks.workloads` (emfm's
own work as its commands do it, timed by several benchmarks); ``peers`` keeps its arms in ``peers_arms``, which
its fresh processes import.
"""
