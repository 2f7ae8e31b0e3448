# Plots of the float-vs-GGUF comparison (the candidates plot is drawn by rules/rank.smk).


rule plot_comparison:
    input:
        compare="results/{model}/compare_models.json",
    output:
        kl=report(
            "results/plots/{model}-size-vs-kl.png",
            caption="../report/size_vs_kl.rst",
            category="Comparison",
            subcategory="{model}",
        ),
        ppl=report(
            "results/plots/{model}-size-vs-perplexity.png",
            caption="../report/size_vs_perplexity.rst",
            category="Comparison",
            subcategory="{model}",
        ),
        speed=report(
            "results/plots/{model}-speed.png",
            caption="../report/speed.rst",
            category="Comparison",
            subcategory="{model}",
        ),
    log:
        "logs/plot_comparison/{model}.log",
    conda:
        "../envs/report.yaml"
    shell:
        "lora2gguf plot comparison --compare {input.compare} --model {wildcards.model}"
        " --size-vs-kl {output.kl} --size-vs-perplexity {output.ppl}"
        " --speed {output.speed} > {log} 2>&1"
