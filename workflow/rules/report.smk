# Tables 2-11, figures, feature maps and the HTML report (reports/), plus one target rule per
# table and per experiment.


rule table:
    input:
        tables=config["tables"],
        metrics=lambda w: table_inputs(int(w.n)),
    output:
        [f"{REPORTS}/tables/table{{n}}.{ext}" for ext in ("md", "csv", "tex", "html")],
    params:
        run=RES,
        outdir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/report/table{{n}}.log",
    wildcard_constraints:
        n="|".join(str(n) for n in TABLE_NUMBERS),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=30,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig report table {wildcards.n} --results {params.run}"
        " --out {params.outdir} > {log} 2>&1"


rule report:
    input:
        [f for f in all_outputs() if f.startswith(f"{REPORTS}/tables/")],
    output:
        f"{REPORTS}/index.html",
    params:
        run=RES,
        outdir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/report/index.log",
    threads: 1
    resources:
        mem_mb=4096,
        runtime=60,
    conda:
        "../envs/smallbig.yaml"
    shell:
        "smallbig report html --results {params.run} --out {params.outdir} > {log} 2>&1"


for _n in TABLE_NUMBERS:

    rule:
        name:
            f"table{_n}"
        input:
            table_files(_n),


for _exp in EXPERIMENTS:

    rule:
        name:
            _exp
        input:
            experiment_outputs(_exp),
