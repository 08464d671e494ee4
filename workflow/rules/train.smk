# Resolve each experiment's params (the merged, validated file the run uses) and train it.
# GPU count, CPUs per GPU, memory and runtime come from the experiment's `resources:` params.


rule resolve_params:
    input:
        exp=f"{EXP_DIR}/{{exp}}.yaml",
        base="params/base.yaml",
        overlay=[OVERLAY] if OVERLAY else [],
    output:
        f"{RES}/{{exp}}/params.yaml",
    params:
        phash=lambda w: PHASH[w.exp],
        overlay=OVERLAY_ARG,
    log:
        f"{LOGS}/params/{{exp}}.log",
    localrule: True
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig params resolve {input.exp} {params.overlay} --out {output} > {log} 2>&1"


rule train:
    input:
        params=f"{RES}/{{exp}}/params.yaml",
        data=lambda w: data_ready(w.exp),
    output:
        checkpoint=f"{RES}/{{exp}}/train/checkpoint.pt",
        history=f"{RES}/{{exp}}/train/history.json",
        metrics=f"{RES}/{{exp}}/train/train_metrics.json",
    params:
        phash=lambda w: PHASH[w.exp],
        outdir=lambda w: res(w.exp, "train"),
        launch=lambda w: launch_prefix(w.exp),
    log:
        f"{LOGS}/train/{{exp}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train-{{exp}}.tsv"
    threads: lambda w: cpus_of(w.exp)
    resources:
        gpu=lambda w: gpus_of(w.exp),
        cpus_per_gpu=lambda w: resources_of(w.exp).get("cpus_per_gpu", 1),
        mem_mb=lambda w: 1024 * resources_of(w.exp).get("mem_gb", 8),
        runtime=lambda w: resources_of(w.exp).get("train_runtime_min", 60),
        # Slurm: one task per GPU for multi-GPU trainings (`srun` starts them)
        tasks_per_gpu=lambda w: 1 if gpus_of(w.exp) > 1 else 0,
    # --resume: a retried or requeued job (preemption, time limit) continues from
    # <outdir>/last.pt, which the engine writes periodically and on SIGTERM/SIGUSR1.
    conda:
        "../envs/smallbig.yaml"
    shell:
        "{params.launch}smallbig train {input.params} --out {params.outdir} --resume > {log} 2>&1"
