# Provenance of one model's build: every input and output with size and sha256, the rule that made
# each output, the config values that shaped it and the package / llama.cpp versions.
# `lora2gguf verify results/{model}/manifest.json` re-hashes against it later.


rule write_manifest:
    input:
        base=base_inputs,
        run=run_inputs,
        eval_text=config["evaluation"]["text"],
        ranking=MODEL_ANALYSIS,
        merged=MERGED_DIR,
        merge_report=MERGE_REPORT,
        f16=F16_GGUF,
        quants=per_quant(QUANT_GGUF),
        sidecars=per_quant(QUANT_SIDECAR),
        imatrix=imatrix_outputs,
        test=TEST_REPORT,
        compare=COMPARE_REPORT,
        plots=[comparison_plot(kind) for kind in COMPARISON_PLOTS],
        deploy=[MODELFILE, DEPLOY_NOTES, DEPLOY_REPORT, CHAT_PARITY],
    output:
        manifest=MANIFEST,
    log:
        LOGS["write_manifest"],
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
