# Fetched once into the resources cache (local rules: compute nodes are often offline).


rule fetch_model:
    output:
        directory(f"{RES}/models/{{model}}"),
    params:
        spec=get_fetch_params,
    log:
        f"results/logs/fetch_model/{{model}}.log",
    threads: 1
    resources:
        mem_mb=get_local_mem_mb("fetch"),
        runtime=120,
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/fetch_model.py"


rule fetch_corpus:
    output:
        directory(f"{RES}/corpus"),
    log:
        "results/logs/fetch_corpus.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/fetch_corpus.py"


rule zeroshot_fixtures:
    input:
        corpus=EXP.corpus_dir(),
    output:
        directory(EXP.fixtures_dir()),
    params:
        n_items=EXP.zeroshot.fixture_items,
        seed=EXP.zeroshot.fixture_seed,
    log:
        "results/logs/zeroshot_fixtures.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/zeroshot_fixtures.py"


# C4 shards, WikiText-2 raw, the lm-eval tasks' evaluation splits (hub names in the config are
# read from these copies: denoiserotator.plan.experiment.Experiment.resolve_source).
rule fetch_dataset:
    output:
        directory(f"{RES}/datasets/{{dataset}}"),
    log:
        "results/logs/fetch_dataset/{dataset}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/fetch_dataset.py"


# Every download the config needs, in one go (on a login node: `snakemake --cores 1 fetch_all`).
rule fetch_all:
    input:
        get_fetch_targets,
