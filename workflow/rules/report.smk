# Tables 2-11, figures, feature maps and the HTML report (reports/), the per-table targets
# table2 ... table11 and one target per experiment id.
#
# Two views of the same files: reports/index.html (`smallbig report html`, checked in Chromium by
# `smallbig report check`) is the report users open; `snakemake --report` collects the tables
# and figures through the report() annotations below (captions in workflow/report/, relative to
# this file). index.html itself is not in the Snakemake report: its relative links would not
# resolve there.
#
# `smallbig report tables` renders every table from whatever results exist (rows without results
# say so). The per-table rule runs it once table N's evaluations exist, into its own directory
# results/<run>/tables/table<N>/ (table<N>.* and that table's verdicts.json there are complete);
# `all` renders into reports/.
# Every report command gets the run's seeds (`--seeds`: mean ± std over seeds, or one seed's
# bootstrap interval) and, for a scaled-down run (config paper_comparable: false),
# `--not-comparable`; `tables` also writes reports/verdicts.json (a verdict per row and claim).
REPORT_ARGS = f"--seeds {SEEDS} {NOT_COMPARABLE_ARG}".strip()


rule table:
    input:
        tables=config["tables"],
        metrics=lambda w: table_inputs(int(w.n)),
        params=lambda w: [f"{RES}/{e}/params.yaml" for e in table_experiments(int(w.n))],
    output:
        directory(f"{RES}/tables/table{{n}}"),
    params:
        run=RUN,
        args=REPORT_ARGS,
    log:
        f"{LOGS}/report/table{{n}}.log",
    wildcard_constraints:
        n="|".join(str(n) for n in TABLE_NUMBERS),
    threads: 1
    resources:
        mem_mb=mem_mb(2048),
        runtime=30,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig report tables --results results --run {params.run} {params.args}"
        " --tables-file {input.tables} --compute-model-info --out {output}"
        " --verdicts {output}/verdicts.json > {log} 2>&1"


rule tables:
    input:
        tables=config["tables"],
        metrics=[f for n in TABLE_NUMBERS for f in table_inputs(n)],
        params=[f"{RES}/{e}/params.yaml" for e in EXPERIMENTS],
    output:
        [
            report(f"{REPORTS}/tables/{f}", caption="../report/table.rst", category="Tables",
                   subcategory=f.split(".")[0])
            if f.endswith((".html", ".csv"))
            else f"{REPORTS}/tables/{f}"
            for f in report_table_files()
        ],
        verdicts=f"{REPORTS}/verdicts.json",
    params:
        run=RUN,
        args=REPORT_ARGS,
        outdir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/report/tables.log",
    threads: 1
    resources:
        mem_mb=mem_mb(2048),
        runtime=30,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig report tables --results results --run {params.run} {params.args}"
        " --tables-file {input.tables} --compute-model-info --out {params.outdir}"
        " --verdicts {output.verdicts} > {log} 2>&1"


rule figures:
    input:
        tables=config["tables"],
        metrics=[f for n in TABLE_NUMBERS for f in table_inputs(n)],
        evaluations=[f for e in EXPERIMENTS for f in experiment_outputs(e)],
        histories=[f"{RES}/{e}/train/history.json" for e in EXPERIMENTS],
        params=[f"{RES}/{e}/params.yaml" for e in EXPERIMENTS],
    output:
        f"{REPORTS}/figures/figures.json",
        report(directory(f"{REPORTS}/figures/summary"), patterns=["{name}.png"],
               caption="../report/ablation.rst", category="Figures",
               subcategory="Accuracy vs cost, ablations", labels={"figure": "{name}"}),
        report(directory(f"{REPORTS}/figures/training"), patterns=["{exp}.png"],
               caption="../report/training.rst", category="Figures",
               subcategory="Training curves", labels={"experiment": "{exp}"}),
        report(directory(f"{REPORTS}/figures/views"), patterns=["{name}.png"],
               caption="../report/views.rst", category="Figures",
               subcategory="Views vs accuracy", labels={"evaluation": "{name}"}),
    params:
        run=RUN,
        args=REPORT_ARGS,
        outdir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/report/figures.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4096),
        runtime=60,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig report figures --results results --run {params.run} {params.args}"
        " --tables-file {input.tables} --compute-model-info --out {params.outdir} > {log} 2>&1"


rule featmaps:
    input:
        smallbig=f"{RES}/{FEATMAPS['smallbig']}/train/checkpoint.pt",
        nonlocal_=f"{RES}/{FEATMAPS['nonlocal']}/train/checkpoint.pt",
        data=data_ready(FEATMAPS["smallbig"]),
    output:
        f"{REPORTS}/figures/featmaps.json",
        report(directory(f"{REPORTS}/figures/featmaps"), patterns=["{video}.png"],
               caption="../report/featmaps.rst", category="Figures",
               subcategory="Feature maps", labels={"video": "{video}"}),
    params:
        run=RUN,
        outdir=lambda w, output: os.path.dirname(output[0]),
        smallbig=FEATMAPS["smallbig"],
        nonlocal_=FEATMAPS["nonlocal"],
        videos=FEATMAPS["videos"],
    log:
        f"{LOGS}/report/featmaps.log",
    threads: 1
    resources:
        mem_mb=mem_mb(8192),
        runtime=60,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig report featmaps --results results --run {params.run} --out {params.outdir}"
        " --smallbig {params.smallbig} --nonlocal {params.nonlocal_} --videos {params.videos}"
        " > {log} 2>&1"


rule report:
    input:
        tables=config["tables"],
        rendered=[f"{REPORTS}/tables/{f}" for f in report_table_files()],
        verdicts=f"{REPORTS}/verdicts.json",
        figures=f"{REPORTS}/figures/figures.json",
        featmaps=f"{REPORTS}/figures/featmaps.json",
        params=[f"{RES}/{e}/params.yaml" for e in EXPERIMENTS],
    output:
        f"{REPORTS}/index.html",
    params:
        run=RUN,
        args=REPORT_ARGS,
        outdir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/report/index.log",
    threads: 1
    resources:
        mem_mb=mem_mb(4096),
        runtime=30,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig report html --results results --run {params.run} {params.args}"
        " --tables-file {input.tables} --compute-model-info --reports {params.outdir}"
        " > {log} 2>&1"


for _n in TABLE_NUMBERS:

    rule:
        name:
            f"table{_n}"
        input:
            f"{RES}/tables/table{_n}",


for _exp in EXPERIMENTS:

    rule:
        name:
            _exp
        input:
            experiment_outputs(_exp),
