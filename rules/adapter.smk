# LoRA adapters shipped beside their base instead of merged into it (config `adapters:`): the base as
# GGUF once per quantization type, each candidate's adapter as a llama.cpp adapter GGUF, and how close
# base + adapter comes to the merged files and to the float model (compare_adapter).


rule convert_base_gguf:
    input:
        model=base_folder_inputs,
    output:
        gguf=BASE_F16_GGUF,
    log:
        LOGS["convert_base_gguf"],
    benchmark:
        BENCHMARKS["convert_base_gguf"]
    conda:
        "../envs/gguf.yaml"
    params:
        folder=base_folder,
        outtype=config["convert"]["outtype"],
        backend=config["convert"]["backend"],
    shell:
        "lora2gguf convert {params.folder:q} {output.gguf:q} --outtype {params.outtype} --backend {params.backend:q}"
        " --name {wildcards.base} > {log} 2>&1"


rule quantize_base_gguf:
    input:
        gguf=BASE_F16_GGUF,
    output:
        gguf=BASE_QUANT_GGUF,
        sidecar=BASE_QUANT_SIDECAR,
    log:
        LOGS["quantize_base_gguf"],
    benchmark:
        BENCHMARKS["quantize_base_gguf"]
    conda:
        "../envs/gguf.yaml"
    threads: config["quantize"]["threads"]
    params:
        type=quant_type,
    shell:
        "lora2gguf quantize {input.gguf} {output.gguf} {params.type}"
        " --threads {threads} --sidecar {output.sidecar} > {log} 2>&1"


rule export_adapter:
    input:
        base=base_inputs,
        run=run_inputs,
    output:
        gguf=ADAPTER_GGUF,
        report=ADAPTER_REPORT,
    log:
        LOGS["export_adapter"],
    benchmark:
        BENCHMARKS["export_adapter"]
    conda:
        "../envs/gguf.yaml"
    params:
        base=candidate_base,
        run=candidate_run,
        pickle="--allow-pickle" if config["merge"]["allow_pickle"] else "",
    shell:
        "lora2gguf adapter {params.run:q} {output.gguf:q} --base {params.base:q}"
        " --outtype {wildcards.atype} --report {output.report:q} {params.pickle} > {log} 2>&1"


rule compare_adapter:
    input:
        unpack(adapter_compare_inputs),
        reference=MERGED_DIR,
        eval_text=config["evaluation"]["text"],
    output:
        report=report(
            ADAPTER_COMPARE,
            caption="../report/adapter_compare.rst",
            category="Adapters",
            subcategory="{model}",
        ),
    log:
        LOGS["compare_adapter"],
    benchmark:
        BENCHMARKS["compare_adapter"]
    conda:
        "../envs/torch.yaml"
    threads: config["evaluation"]["threads"]
    params:
        pairs=adapter_compare_pairs,
        max_tokens=config["evaluation"]["max_tokens"],
        context=config["evaluation"]["context"],
        device=config["evaluation"]["device"],
    shell:
        "lora2gguf adapter-compare --reference {input.reference:q} --adapter {input.adapter:q}"
        " {params.pairs} --eval-text {input.eval_text:q} --max-tokens {params.max_tokens}"
        " --context {params.context} --device {params.device} --threads {threads}"
        " --out {output.report:q} > {log} 2>&1"
