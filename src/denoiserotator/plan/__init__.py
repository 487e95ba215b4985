"""The plan: the experiment grid and its output ids, the resource requests of each job (costs,
counted work in flops, the site's partitions) and the plan check (`python -m denoiserotator.plan`)."""
