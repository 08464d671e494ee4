# Multi-view evaluation of each trained checkpoint (one job per experiment, seed and protocol)
# and score-fusion ensembles from the members' saved per-view scores (one per seed: replicate k
# of an ensemble, {name} = "<name>/seed-<k>", fuses replicate k of each member).


rule evaluate:
    input:
        params=f"{RES}/{{exp}}/params.yaml",
        checkpoint=f"{RES}/{{exp}}/train/checkpoint.pt",
        data=lambda w: data_ready(w.exp),
    output:
        scores=f"{RES}/{{exp}}/eval-{{proto}}/scores.npz",
        metrics=f"{RES}/{{exp}}/eval-{{proto}}/metrics.json",
    params:
        phash=lambda w: phash(w.exp),
        outdir=lambda w: eval_dir(w.exp, w.proto),
    log:
        f"{LOGS}/evaluate/{{exp}}-{{proto}}.log",
    benchmark:
        f"{LOGS}/benchmarks/evaluate-{{exp}}-{{proto}}.tsv"
    threads: lambda w: resources_of(w.exp).get("cpus_per_gpu", 1)
    resources:
        # one GPU per evaluation (the paper-protocol evaluations of 25 models run side by side)
        gpu=lambda w: min(1, gpus_of(w.exp)),
        cpus_per_gpu=lambda w: resources_of(w.exp).get("cpus_per_gpu", 1),
        mem_mb=lambda w: 1024 * max(1, resources_of(w.exp).get("mem_gb", 8) // max(1, gpus_of(w.exp))),
        runtime=lambda w: resources_of(w.exp).get("eval_runtime_min", 60),
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig evaluate {input.params} --checkpoint {input.checkpoint}"
        " --protocol {wildcards.proto} --out {params.outdir} > {log} 2>&1"


rule ensemble:
    input:
        lambda w: [
            f"{eval_dir(rep(m, split_rep(w.name)[1]), ENSEMBLES[base(w.name)]['protocol'])}/scores.npz"
            for m in ENSEMBLES[base(w.name)]["members"]
        ],
    output:
        f"{RES}/ensembles/{{name}}/metrics.json",
    params:
        outdir=lambda w: f"{RES}/ensembles/{w.name}",
        name=lambda w: base(w.name),
    log:
        f"{LOGS}/ensemble/{{name}}.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4096),
        runtime=30,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig ensemble {input} --name {params.name} --out {params.outdir} > {log} 2>&1"
