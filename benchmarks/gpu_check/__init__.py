"""The one-call GPU check: compiled-kernel numerics, timings and the static predictions, in 8 minutes.

On a machine without a GPU everything this project can prove is proven here (interpreter tests,
ahead-of-time compiles, the static cost report); what needs a GPU is gathered into one command
that fits one device call (10 minutes at most) and writes one folder to commit:

    python -m benchmarks.gpu_check pack               # here: carried packages (.gpu_site/) + the device command
    python -m benchmarks.gpu_check run --out $OUT     # there: one CUDA GPU, < 8 minutes (self-timed)
    python -m benchmarks.gpu_check run --dry-run      # here: every phase's plan, written as the folder would be
    python -m benchmarks.gpu_check merge FOLDER       # here: copy the fetched folder in, regenerate the tables

``run`` writes ``<out>/gpu-check-<device slug>/`` (at most 8 files, as a device call returns them):

    summary.md                  what ran, what passed, what was cut by the budget and why
    gpu_check.json              the record: environment, every phase's plan, status, time and reason
    tests.xml, tests.txt        ``pytest -m gpu`` (junit, and the verbose log) over every gpu-marked test file
    results.csv                 benchmarks.run --preset gpu-check (results.py's schema), plus the cells the
    environment.json            static report predicts that the preset does not cover (same providers/timers)
    predicted_vs_measured.csv   measured us next to benchmarks/static's prediction for this device

Phases, in order, each given a share of what is left of the budget (it checks its deadline, skips
or truncates with the reason recorded, never overruns): environment; compile (every kernel
specialization the later phases launch, from flare_kernels.ops.plan.launch_plan, compiled into
Triton's cache by parallel processes: on one process the tests would spend most of their time in
the compiler); tests; bench; predicted; summary. Nothing here queries CUDA at import time.
"""

# Modules (each imports only those before it):
# layout      where it reads and writes: the repository, the results tree, the folder's files
# budget      the time budget: each phase's share of what is left (Budget, Phase)
# child       child processes with a deadline (SIGTERM, then SIGKILL) and the carried site
# plan        what it runs: the gpu test files, the kernel launches to warm up, the preset's cells
# compare     the static predictions for this device, joined with the measured times
# warm, measure   the two worker processes (``_warm``, ``_measure``): compile, time predicted cells
# testrun, phases, summary, check   the phases and the folder's summary.md; ``Check`` runs them
# pack, merge, cli    the commands (``python -m benchmarks.gpu_check``)
