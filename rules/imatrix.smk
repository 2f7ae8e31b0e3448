# Importance matrix of the merged model over the calibration text (lora2gguf imatrix), in
# llama.cpp's imatrix GGUF format; only built when a quantize.types entry has imatrix: true.


rule compute_imatrix:
    input:
        model="models/{model}-merged",
        text=config.get("calibration", {}).get("text", []),
    output:
        imatrix="models/{model}-merged-gguf/imatrix.gguf",
        report=report(
            "results/{model}/imatrix.json",
            caption="../report/imatrix.rst",
            category="Quantization",
            subcategory="{model}",
        ),
    log:
        "logs/compute_imatrix/{model}.log",
    benchmark:
        "benchmarks/compute_imatrix/{model}.tsv"
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
