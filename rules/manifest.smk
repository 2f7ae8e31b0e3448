import shlex

# Provenance of one model's build: every input and output with size and sha256, the rule that made
# each output, the config values that shaped it and the package / llama.cpp versions.
# `lora2gguf verify results/{model}/manifest.json` re-hashes against it later.


def drop_threads(section):
    """Thread counts change speed, not results: left out of the manifest so they rerun nothing."""
    return {key: value for key, value in section.items() if key != "threads"}


def manifest_config(wildcards):
    """The config values that shape this model's artifacts (as JSON, so a change reruns the manifest)."""
    return json.dumps(
        {
            "candidate": {"name": wildcards.model, **candidate(wildcards)},
            "selection": config["selection"],
            "merge": config["merge"],
            "convert": config["convert"],
            "quantize": drop_threads(config["quantize"]),
            "evaluation": drop_threads(config["evaluation"]),
            "generation": config["generation"],
            "test_prompts": config["test_prompts"],
        },
        ensure_ascii=False,
        sort_keys=True,
    )


def manifest_outputs(wildcards, input):
    paths = [
        input.merged,
        input.merge_report,
        input.f16,
        *input.quants,
        *input.sidecars,
        input.test,
        input.compare,
        *input.plots,
    ]
    return " ".join(f"--output {shlex.quote(str(path))}" for path in paths)


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
        test="results/{model}/merged_model_test.json",
        compare="results/{model}/compare_models.json",
        plots=expand("results/plots/{{model}}-{kind}.png", kind=COMPARISON_PLOTS),
    output:
        manifest="results/{model}/manifest.json",
    log:
        "logs/write_manifest/{model}.log",
    params:
        base=candidate_base,
        run=candidate_run,
        config=manifest_config,
        outputs=manifest_outputs,
    shell:
        "lora2gguf manifest --model {wildcards.model}"
        " --input base={params.base:q} --input run={params.run:q}"
        " --input eval_text={input.eval_text:q} --input ranking={input.ranking:q}"
        " {params.outputs} --config-json {params.config:q} --out {output.manifest:q} > {log} 2>&1"
