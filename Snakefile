# DenoiseRotator: calibrate -> rotate+prune -> (LoRA) -> evaluate -> tables.
#   snakemake --cores 2 --configfile config/demo.yaml results/tables/main.csv   (the embedded demo)
#   snakemake --profile slurm results/tables/main.csv                           (the paper grid)
# Settings: config/README.md. Rules: workflow/rules/. The numerics live in src/denoiserotator.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/assets.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


localrules:
    all,
    fetch_model,
    fetch_corpus,
    zeroshot_fixtures,
    tables,


rule all:
    input:
        get_final_targets(),
    default_target: True
