# Importance matrix of the merged model over the calibration text (lora2gguf imatrix), in
# llama.cpp's imatrix GGUF format; only built when a quantize.types entry has imatrix: true.


rule compute_imatrix:
    input:
        model=MERGED_DIR,
        text=config.get("calibration", {}).get("text", []),
    output:
        imatrix=IMATRIX_GGUF,
        report=report(
            IMATRIX_REPORT,
            caption="../report/imatrix.rst",
            category="Quantization",
            subcategory="{model}",
        ),
    log:
        LOGS["compute_imatrix"],
    benchmark:
        BENCHMARKS["compute_imatrix"]
    conda:
        "../envs/torch.yaml"
    threads: config.get("calibration", {}).get("threads", 1)
    params:
        max_tokens=calibration_max_tokens_arg(),
        chunk_size=config.get("calibration", {}).get("chunk_size", 512),
        device=config.get("calibration", {}).get("device", "auto"),
    shell:
        "lora2gguf imatrix --model {input.model} --text {input.text}"
        " --out {output.imatrix} --report {output.report} --chunk-size {params.chunk_size}"
        " {params.max_tokens} --device {params.device} --threads {threads} > {log} 2>&1"
