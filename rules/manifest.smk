# Provenance of one model's build: every input and output with size and sha256, the rule that made
# each output, the config values that shaped it and the package / llama.cpp versions.
# `lora2gguf verify results/{model}/manifest.json` re-hashes against it later.


rule write_manifest:
    input:
        base=base_inputs,
        run=run_inputs,
        eval_text=config["evaluation"]["text"],
        ranking="results/model_analysis.json",
        merged="models/{model}-merged",
        merge_report="results/{model}/merge_report.json",
        f16="models/{model}-merged-gguf/model.gguf",
        quants=expand("models/{{model}}-merged-gguf/model-{q}.gguf", q=quant_tags()),
        sidecars=expand("models/{{model}}-merged-gguf/model-{q}.json", q=quant_tags()),
        imatrix=imatrix_outputs,
        test="results/{model}/merged_model_test.json",
        compare="results/{model}/compare_models.json",
        plots=expand("results/plots/{{model}}-{kind}.png", kind=COMPARISON_PLOTS),
    output:
        manifest="results/{model}/manifest.json",
    log:
        "logs/write_manifest/{model}.log",
    conda:
        "../envs/report.yaml"
    params:
        base=candidate_base,
        run=candidate_run,
        calibration=calibration_input_arg,
        config=manifest_config,
        outputs=manifest_outputs,
    shell:
        "lora2gguf manifest --model {wildcards.model}"
        " --input base={params.base:q} --input run={params.run:q}"
        " --input eval_text={input.eval_text:q} --input ranking={input.ranking:q} {params.calibration}"
        " {params.outputs} --config-json {params.config:q} --out {output.manifest:q} > {log} 2>&1"
