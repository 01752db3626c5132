"""Run a study: every (arm, seed) of a plan as its own torchrun run, then a report.

    graft-study studies/cifar10_cpu.yaml            # run what is left, rewrite the report
    graft-study studies/cifar10_cpu.yaml --dry-run  # print the commands
    graft-study studies/cifar10_cpu.yaml --report   # only rewrite the report
    graft-study studies/paper/cifar10_resnet.yaml --only 'resnet32_*' data.download=true

A plan (YAML) names a base config, common overrides, the arms (name, networks, overrides), the
seeds and the study's name. Runs go to ``<root>/<name>/<arm>/seed<k>/`` one after another.
Finished runs are skipped and an interrupted one resumes (the launcher's ``resume: auto``), so
the same command continues a study after any stop. Each run records the code version it ran
(git commit, and whether the tree had changes) and the machine (CPU, cores, GPU) of each attempt
in ``study.json`` beside its outputs.

A finished run's small files (config.yaml, metrics.jsonl, summary.json, study.json; no
checkpoints) are copied to ``<results>/<name>/<arm>/seed<k>/``, with weights.json from the final
checkpoints: how far apart the networks end (``final_distance``) and how many invalid filters
sit where the peer's filter is invalid too (``invalid_in_both``). The report is made from these files
alone, they can be committed beside it as its evidence, and a run found there counts as
finished, so a study continues on another machine from the committed results. After every run
the report is rewritten: ``<results>/<name>.md`` and ``<name>.png``.
"""

from .runner import main

__all__ = ["main"]
