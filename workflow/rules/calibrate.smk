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
        slurm_partition=get_resource("calibrate", "slurm_partition"),
        mem_mb=get_resource("calibrate", "mem_mb"),
        runtime=get_resource("calibrate", "runtime"),
    conda:
        "../../envs/cluster.yaml"
    script:
        "../scripts/calibrate.py"
