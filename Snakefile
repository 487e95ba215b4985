# DenoiseRotator: calibrate -> rotate+prune -> (LoRA) -> evaluate -> tables.
#   snakemake results/tables/main.csv --cores 2 --configfile config/demo.yaml   (the embedded demo)
#   snakemake --profile slurm results/tables/main.csv                           (the paper grid)
# Settings: config/README.md. Rules: workflow/rules/. The numerics live in src/denoiserotator.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    model=r"[a-z0-9][a-z0-9.-]*",
    calib=r"c-[0-9a-f]{8}",
    variant=VARIANT_RE,
    ft=r"[0-9a-f]{8}",
    row=ROW_RE,
    set=r"[A-Za-z0-9_]+",
    pplid=r"[0-9a-f]{8}",
    zsid=r"[0-9a-f]{8}",
    dataset=r"c4|wikitext2|lm-eval",


include: "workflow/rules/assets.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


localrules:
    all,
    fetch_model,
    fetch_corpus,
    fetch_dataset,
    fetch_all,
    zeroshot_fixtures,
    tables,


rule all:
    input:
        get_final_targets(),
    default_target: True
