rule prune:
    input:
        unpack(get_prune_inputs),
    output:
        model=directory("results/models/{model}/{calib}/{variant}/hf"),
        stats="results/models/{model}/{calib}/{variant}/stats.json",
    params:
        settings=get_prune_params,
    log:
        "results/logs/prune/{model}/{calib}/{variant}.log",
    benchmark:
        "results/benchmarks/prune/{model}/{calib}/{variant}.tsv"
    threads: get_threads("prune")
    retries: PRUNE_RETRIES
    resources:
        slurm_partition=get_resource("prune", "slurm_partition"),
        mem_mb=get_resource("prune", "mem_mb"),
        runtime=get_resource("prune", "runtime"),
        gpu=get_resource("prune", "gpu"),
        gpu_model=get_resource("prune", "gpu_model"),
        gres=get_resource("prune", "gres"),
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/prune.py"


rule finetune:
    input:
        unpack(get_finetune_inputs),
    output:
        model=directory("results/models/{model}/{calib}/{variant}/lora-{ft}/hf"),
        stats="results/models/{model}/{calib}/{variant}/lora-{ft}/stats.json",
    params:
        settings=get_finetune_params,
    log:
        "results/logs/finetune/{model}/{calib}/{variant}/lora-{ft}.log",
    benchmark:
        "results/benchmarks/finetune/{model}/{calib}/{variant}/lora-{ft}.tsv"
    threads: get_threads("finetune")
    resources:
        slurm_partition=get_resource("finetune", "slurm_partition"),
        mem_mb=get_resource("finetune", "mem_mb"),
        runtime=get_resource("finetune", "runtime"),
        gpu=get_resource("finetune", "gpu"),
        gpu_model=get_resource("finetune", "gpu_model"),
        gres=get_resource("finetune", "gres"),
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/finetune.py"
