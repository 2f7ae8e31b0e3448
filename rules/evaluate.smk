# Inference test of the merged model and the float-vs-GGUF comparison in llama.cpp.
# Prompts and generation settings travel as inline JSON params (not the config file), so that a change
# of just those keys, and nothing else in config.yaml, makes these results stale.


rule test_merged_model:
    input:
        model=MERGED_DIR,
    output:
        report=report(
            TEST_REPORT,
            caption="../report/merged_model_test.rst",
            category="Evaluation",
            subcategory="{model}",
        ),
    log:
        LOGS["test_merged_model"],
    benchmark:
        BENCHMARKS["test_merged_model"]
    conda:
        "../envs/torch.yaml"
    threads: config["evaluation"]["threads"]
    params:
        prompts=json.dumps(config["test_prompts"], ensure_ascii=False),
        generation=json.dumps(config["generation"]),
        device=config["evaluation"]["device"],
        decode=config["evaluation"].get("decode", "auto"),
    shell:
        "lora2gguf test --model {input.model} --prompts {params.prompts:q}"
        " --generation {params.generation:q} --device {params.device}"
        " --decode {params.decode} --threads {threads} --out {output.report} > {log} 2>&1"


rule compare_models:
    input:
        reference=MERGED_DIR,
        f16=F16_GGUF,
        quants=per_quant(QUANT_GGUF),
        sidecars=per_quant(QUANT_SIDECAR),
        eval_text=config["evaluation"]["text"],
    output:
        report=report(
            COMPARE_REPORT,
            caption="../report/compare_models.rst",
            category="Evaluation",
            subcategory="{model}",
        ),
    log:
        LOGS["compare_models"],
    benchmark:
        BENCHMARKS["compare_models"]
    conda:
        "../envs/torch.yaml"
    threads: config["evaluation"]["threads"]
    params:
        gguf=lambda wildcards, input: " ".join(
            f"--gguf {path}" for path in [input.f16, *input.quants]
        ),
        prompts=json.dumps(config["test_prompts"], ensure_ascii=False),
        max_new_tokens=config["generation"]["max_new_tokens"],
        max_tokens=config["evaluation"]["max_tokens"],
        context=config["evaluation"]["context"],
        device=config["evaluation"]["device"],
    shell:
        "lora2gguf compare --reference {input.reference} {params.gguf}"
        " --eval-text {input.eval_text} --max-tokens {params.max_tokens}"
        " --context {params.context} --prompts {params.prompts:q}"
        " --max-new-tokens {params.max_new_tokens} --device {params.device}"
        " --threads {threads} --out {output.report} > {log} 2>&1"
