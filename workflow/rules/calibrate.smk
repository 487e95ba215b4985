rule calibrate:
    input:
        unpack(get_calib_inputs),
    output:
        ids="results/calib/{model}/{calib}.pt",
        meta="results/calib/{model}/{calib}.json",
    params:
        settings=get_calib_params,
    log:
        "results/logs/calibrate/{model}/{calib}.log",
    benchmark:
        "results/benchmarks/calibrate/{model}/{calib}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/calibrate.py"
