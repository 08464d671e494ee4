# Resolve each experiment's params (the merged, validated file the run uses) and train it.
# GPU count, CPUs per GPU, memory and runtime come from the experiment's `resources:` params.
# Seeds (config `seeds`, common.smk): replicate k > 0 ({exp} = "<id>/seed-<k>") resolves its
# params from replicate 0's with an overlay that sets train.seed and trains into <id>/seed-<k>/.


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
    wildcard_constraints:
        exp=IDS_RE,
    localrule: True
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig params resolve {input.exp} {params.overlay} --out {output} > {log} 2>&1"


# Replicate k > 0: replicate 0's resolved params with train.seed + k (`--set`, validated by the
# params schema like any overlay).
rule resolve_seed_params:
    input:
        params=f"{RES}/{{exp}}/params.yaml",
    output:
        f"{RES}/{{exp}}/seed-{{k}}/params.yaml",
    params:
        phash=lambda w: phash(rep(w.exp, int(w.k))),
        seed=lambda w: train_seed(w.exp, int(w.k)),
    log:
        f"{LOGS}/params/{{exp}}/seed-{{k}}.log",
    wildcard_constraints:
        exp=IDS_RE,
        k=r"[1-9][0-9]*",
    localrule: True
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig params resolve {input.params} --set train.seed={params.seed} --out {output} > {log} 2>&1"


rule train:
    input:
        params=f"{RES}/{{exp}}/params.yaml",
        data=lambda w: data_ready(w.exp),
        pretrained=lambda w: pretrained_input(w.exp),
    output:
        checkpoint=f"{RES}/{{exp}}/train/checkpoint.pt",
        history=f"{RES}/{{exp}}/train/history.json",
        metrics=f"{RES}/{{exp}}/train/train_metrics.json",
    params:
        phash=lambda w: phash(w.exp),
        outdir=lambda w: res(w.exp, "train"),
        launch=lambda w: launch_of(w.exp)["prefix"],
        margin=STOP_BEFORE_LIMIT_S,
    log:
        f"{LOGS}/train/{{exp}}.log",
    benchmark:
        f"{LOGS}/benchmarks/train-{{exp}}.tsv"
    threads: lambda w: cpus_of(w.exp)
    resources:
        gpu=lambda w: gpus_of(w.exp),
        cpus_per_gpu=lambda w: resources_of(w.exp).get("cpus_per_gpu", 1),
        mem_mb=lambda w: 1024 * resources_of(w.exp).get("mem_gb", 8),
        runtime=lambda w: train_runtime(w.exp),
        # one task per GPU, the processes started by the rule itself (common.smk, launch_of)
        tasks_per_gpu=1,
        tasks=lambda w: launch_of(w.exp)["tasks"],
        mpi=lambda w: launch_of(w.exp)["mpi"],
        nodes=lambda w: launch_of(w.exp)["nodes"],
    # A job stopped by preemption, a signal or its time limit checkpoints <outdir>/last.pt and
    # fails (exit 3); Snakemake submits it again and `--resume` continues from there. The job's
    # log is replaced by each attempt; <outdir>/train.log keeps the engine's messages of all.
    # (main process only: the Snakemake inside a Slurm job must not re-run a training whose job
    # is being stopped; it runs with --retries 0, which a rule's own value would override)
    retries: train_retries() if workflow.is_main_process else 0
    conda:
        "../envs/smallbig.yaml"
    shell:
        "{params.launch}smallbig train {input.params} --out {params.outdir} --resume"
        " --stop-before-limit {params.margin} > {log} 2>&1"
