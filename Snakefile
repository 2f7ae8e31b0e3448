from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/rank.smk"
include: "rules/merge.smk"
include: "rules/convert.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/plot.smk"


rule all:
    default_target: True
    input:
        "results/model_analysis.json",
        "results/plots/candidates.png",
        best_model_targets,
