# ImageNet initialisation: the torchvision ResNet files the trainings start from (params
# `model.pretrained`, declared under `pretrained_weights:` in params/base.yaml). One download
# per file, shared by every training that loads it; `none` (the embedded default) needs nothing.
#
# A local rule: a download needs the internet, which a cluster's login/submit node has and its
# compute nodes often do not, and it needs no GPU and little CPU. `smallbig pretrained fetch`
# resumes an interrupted download, verifies the SHA-256 before the file gets its final name, and
# keeps a file that is already there and verified.
from smallbig.models import weights as sbweights

# The files the training of an experiment needs before it starts ([] for `none`): the input
# `pretrained=` of rule train.
pretrained_input = lambda exp: sbweights.required_files(PARAMS[base(exp)])

# file -> (name, declaration, an experiment loading it) for each declared file this run's
# experiments load: the full run downloads the two torchvision files, the embedded run nothing.
# The rule reads the declarations from params/base.yaml (+ the run's overlay), so that which
# experiments are configured never changes the download job; each must agree with the
# experiments' own (a new or changed declaration belongs in params/base.yaml).
PRETRAINED_DECLARED_IN = "params/base.yaml"
try:
    PRETRAINED_FILES = sbweights.workflow_files(PARAMS)
    sbweights.check_declared_in(PRETRAINED_FILES, PRETRAINED_DECLARED_IN, OVERLAY)
except (sbweights.PretrainedError, sbconfig.ParamsError) as e:
    raise WorkflowError(f"invalid params, nothing was run or submitted:\n  {e}")


# The full-scale rehearsal (workflow/config/rehearsal.yaml) "downloads" generated, byte-
# reproducible torchvision-format files instead of ImageNet weights: their declarations
# (params/rehearsal.yaml) point `url` at config `imagenet_test_files`/resnet<depth>.pth.
IMAGENET_TEST_FILES = config.get("imagenet_test_files")


# the generated file a rehearsal download reads ([] for a real URL)
pretrained_source = lambda w: [
    u
    for u in [PRETRAINED_FILES[f"data/pretrained/{w.file}"][1]["url"]]
    if IMAGENET_TEST_FILES and u.startswith(f"{IMAGENET_TEST_FILES}/")
]


if IMAGENET_TEST_FILES:

    rule imagenet_test_file:
        output:
            f"{IMAGENET_TEST_FILES}/resnet{{depth}}.pth",
        log:
            f"{LOGS}/pretrained/test-file-resnet{{depth}}.log",
        wildcard_constraints:
            depth="50|101",
        localrule: True
        conda:
            "../envs/smallbig.yaml"
        shell:
            "smallbig pretrained make-test-file --depth {wildcards.depth} --deterministic"
            " --out {output} > {log} 2>&1"


if PRETRAINED_FILES:

    rule pretrained:
        input:
            source=pretrained_source,
        output:
            "data/pretrained/{file}",
        params:
            name=lambda w: PRETRAINED_FILES[f"data/pretrained/{w.file}"][0],
            declared_in=PRETRAINED_DECLARED_IN,
            overlay=OVERLAY_ARG,
        log:
            f"{LOGS}/pretrained/{{file}}.log",
        wildcard_constraints:
            file="|".join(re.escape(f.removeprefix("data/pretrained/")) for f in PRETRAINED_FILES),
        localrule: True
        conda:
            "../envs/smallbig.yaml"
        shell:
            "smallbig pretrained fetch {params.name} --params {params.declared_in} {params.overlay} "
            "> {log} 2>&1"
