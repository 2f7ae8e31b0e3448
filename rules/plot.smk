# Plots of the float-vs-GGUF comparison (the candidates plot is drawn by rules/rank.smk).


rule plot_comparison:
    input:
        compare=COMPARE_REPORT,
    output:
        kl=report(
            comparison_plot(SIZE_VS_KL),
            caption="../report/size_vs_kl.rst",
            category="Comparison",
            subcategory="{model}",
        ),
        ppl=report(
            comparison_plot(SIZE_VS_PERPLEXITY),
            caption="../report/size_vs_perplexity.rst",
            category="Comparison",
            subcategory="{model}",
        ),
        speed=report(
            comparison_plot(SPEED),
            caption="../report/speed.rst",
            category="Comparison",
            subcategory="{model}",
        ),
    log:
        LOGS["plot_comparison"],
    conda:
        "../envs/report.yaml"
    shell:
        "lora2gguf plot comparison --compare {input.compare} --model {wildcards.model}"
        " --size-vs-kl {output.kl} --size-vs-perplexity {output.ppl}"
        " --speed {output.speed} > {log} 2>&1"
