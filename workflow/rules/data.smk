# Data: each dataset the experiments use is made training-ready by `smallbig data prepare`
# (acquire -> canonical lists -> frames when data.format is frames -> check every video ->
# quarantine.json -> manifest.json, written last; idempotent and resumable). It uses the params
# of one of the dataset's experiments (they all agree on data.root/source/format; checked at
# parse time). The embedded run first generates its source trees with `smallbig data toy`.


if config.get("toy_data"):

    rule data_toy:
        # toy.json is written last; the rest of the source trees are not listed one by one
        output:
            f"{config['toy_data']}/toy.json",
        params:
            outdir=config["toy_data"],
            args=config.get("toy_args") or "",
        log:
            f"{LOGS}/data/toy.log",
        threads: 1
        resources:
            mem_mb=mem_mb(2048),
            runtime=30,
        conda:
            "../envs/smallbig.yaml"
        shell:
            "smallbig data toy --out {params.outdir} {params.args} > {log} 2>&1"


rule data_prepare:
    input:
        params=data_params,
        toy=[f"{config['toy_data']}/toy.json"] if config.get("toy_data") else [],
    output:
        manifest="{root}/manifest.json",
        quarantine="{root}/quarantine.json",
        train="{root}/train.txt",
        val="{root}/val.txt",
        classes="{root}/classes.json",
    log:
        f"{LOGS}/data/prepare/{{root}}.log",
    params:
        workers=lambda w, threads: threads,
    threads: lambda w: 4 if RUN == "full" else 1
    wildcard_constraints:
        root="|".join(re.escape(r) for r in ROOT_TO_DATASET),
    resources:
        mem_mb=mem_mb(8192),
        runtime=24 * 60,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig data prepare {input.params} --workers {params.workers} --quiet > {log} 2>&1"


for _ds, _info in DATASETS.items():

    rule:
        name:
            f"data_{_ds}"
        input:
            f"{_info['root']}/manifest.json",
