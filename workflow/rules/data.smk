# Data: acquire/prepare each dataset the experiments use, extract frames, check every video.
# A dataset's rules use the params of one of its experiments (all of a dataset's experiments
# agree on data.root/source/format; common.smk checks that at parse time).


if config.get("toy_data"):

    rule data_toy:
        output:
            directory(config["toy_data"]),
        log:
            f"{LOGS}/data/toy.log",
        threads: 1
        resources:
            mem_mb=2048,
            runtime=30,
        conda:
            "../envs/smallbig.yaml"
        shell:
            "smallbig data toy --out {output} > {log} 2>&1"


rule data_prepare:
    input:
        params=data_params,
        toy=[config["toy_data"]] if config.get("toy_data") else [],
    output:
        manifest="{root}/manifest.json",
        train="{root}/train.txt",
        val="{root}/val.txt",
        classes="{root}/classes.json",
    log:
        f"{LOGS}/data/prepare-{{root}}.log".replace("{root}", "{root}"),
    threads: 4
    resources:
        mem_mb=8192,
        runtime=24 * 60,
    wildcard_constraints:
        root="|".join(re.escape(r) for r in ROOT_TO_DATASET),
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig data prepare {input.params} > {log} 2>&1"


rule data_check:
    input:
        params=data_params,
        manifest="{root}/manifest.json",
        val="{root}/val.txt",
        train="{root}/train.txt",
    output:
        "{root}/quarantine.json",
    log:
        f"{LOGS}/data/check-{{root}}.log",
    threads: 4
    resources:
        mem_mb=8192,
        runtime=12 * 60,
    wildcard_constraints:
        root="|".join(re.escape(r) for r in ROOT_TO_DATASET),
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig data check {input.params} --out {output} > {log} 2>&1"


for _ds, _info in DATASETS.items():

    rule:
        name:
            f"data_{_ds}"
        input:
            f"{_info['root']}/quarantine.json",
