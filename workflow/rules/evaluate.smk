rule perplexity:
    input:
        unpack(get_ppl_inputs),
    output:
        "results/eval/{row}/ppl-{set}-{pplid}.json",
    params:
        settings=get_ppl_params,
    log:
        "results/logs/perplexity/{row}/{set}-{pplid}.log",
    benchmark:
        "results/benchmarks/perplexity/{row}/{set}-{pplid}.tsv"
    threads: get_threads("perplexity")
    resources:
        slurm_partition=get_resource("perplexity", "slurm_partition"),
        mem_mb=get_resource("perplexity", "mem_mb"),
        runtime=get_resource("perplexity", "runtime"),
        gpu=get_resource("perplexity", "gpu"),
        gpu_model=get_resource("perplexity", "gpu_model"),
        gres=get_resource("perplexity", "gres"),
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/perplexity.py"


rule zeroshot:
    input:
        unpack(get_zeroshot_inputs),
    output:
        "results/eval/{row}/zeroshot-{zsid}.json",
    params:
        settings=get_zeroshot_params,
    log:
        "results/logs/zeroshot/{row}/{zsid}.log",
    benchmark:
        "results/benchmarks/zeroshot/{row}/{zsid}.tsv"
    threads: get_threads("zeroshot")
    resources:
        slurm_partition=get_resource("zeroshot", "slurm_partition"),
        mem_mb=get_resource("zeroshot", "mem_mb"),
        runtime=get_resource("zeroshot", "runtime"),
        gpu=get_resource("zeroshot", "gpu"),
        gpu_model=get_resource("zeroshot", "gpu_model"),
        gres=get_resource("zeroshot", "gres"),
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/zeroshot.py"


# Sparsity read back from the saved folder (not the pruner's own count).
rule sparsity:
    input:
        model=get_eval_model,
    output:
        "results/eval/{row}/sparsity.json",
    log:
        "results/logs/sparsity/{row}.log",
    threads: 1
    resources:
        slurm_partition=get_resource("sparsity", "slurm_partition"),
        mem_mb=get_resource("sparsity", "mem_mb"),
        runtime=get_resource("sparsity", "runtime"),
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/sparsity.py"
