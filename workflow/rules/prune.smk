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
    resources:
        mem_mb=get_mem_mb("prune"),
        runtime=get_runtime("prune"),
        gpu=get_gpu("prune"),
        gpu_model=get_gpu("prune", "gpu_model"),
        gres=get_gpu("prune", "gres"),
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
        mem_mb=get_mem_mb("finetune"),
        runtime=get_runtime("finetune"),
        gpu=get_gpu("finetune"),
        gpu_model=get_gpu("finetune", "gpu_model"),
        gres=get_gpu("finetune", "gres"),
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/finetune.py"
