checkpoint rank_candidates:
    input:
        rank_inputs,
    output:
        analysis=MODEL_ANALYSIS,
    log:
        LOGS["rank_candidates"],
    conda:
        "../envs/report.yaml"
    params:
        candidates=rank_candidate_args(),
        metric=config["selection"]["metric"],
        mode=config["selection"]["mode"],
    shell:
        "lora2gguf rank {params.candidates} --metric {params.metric}"
        " --mode {params.mode} --out {output.analysis} > {log} 2>&1"


rule plot_candidates:
    input:
        analysis=MODEL_ANALYSIS,
    output:
        report(
            CANDIDATES_PLOT,
            caption="../report/candidates.rst",
            category="Ranking",
        ),
    log:
        LOGS["plot_candidates"],
    conda:
        "../envs/report.yaml"
    shell:
        "lora2gguf plot candidates --analysis {input.analysis} --out {output} > {log} 2>&1"
