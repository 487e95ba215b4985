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
        mem_mb=get_mem_mb("perplexity"),
        runtime=get_runtime("perplexity"),
        gpu=get_gpu("perplexity"),
        gpu_model=get_gpu("perplexity", "gpu_model"),
        gres=get_gpu("perplexity", "gres"),
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
        mem_mb=get_mem_mb("zeroshot"),
        runtime=get_runtime("zeroshot"),
        gpu=get_gpu("zeroshot"),
        gpu_model=get_gpu("zeroshot", "gpu_model"),
        gres=get_gpu("zeroshot", "gres"),
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
        mem_mb=get_mem_mb("sparsity"),
        runtime=30,
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/sparsity.py"
