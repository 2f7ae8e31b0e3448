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
include: "rules/imatrix.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/plot.smk"
include: "rules/deploy.smk"
include: "rules/adapter.smk"
include: "rules/manifest.smk"


# Light rules stay on the submitting host when a cluster executor is used.
localrules:
    all,
    rank_candidates,
    plot_candidates,
    plot_comparison,
    write_manifest,
    deploy_model,
    export_adapter,
    build_demo_data,
    build_demo_tiny_base,


rule all:
    default_target: True
    input:
        MODEL_ANALYSIS,
        CANDIDATES_PLOT,
        best_model_targets,
        adapter_targets(),
