# Quantization of the F16 GGUF with lora2gguf's own quantizer (llama.cpp's recipes and block
# formats, in numpy; no llama-quantize binary). One job per configured type; the {q} tag maps back
# to the type with quant_type() from rules/common.smk (Q4_K_M <-> q4_km); a tag ending in -imat
# (q4_km-imat) adds the importance matrix from rules/imatrix.smk as an input.
rule quantize_gguf:
    input:
        unpack(quantize_inputs),
    output:
        gguf=QUANT_GGUF,
        sidecar=QUANT_SIDECAR,
    log:
        LOGS["quantize_gguf"],
    benchmark:
        BENCHMARKS["quantize_gguf"]
    conda:
        "../envs/gguf.yaml"
    threads: config["quantize"]["threads"]
    params:
        type=quant_type,
        imatrix=imatrix_arg,
    shell:
        "lora2gguf quantize {input.gguf} {output.gguf} {params.type} {params.imatrix}"
        " --threads {threads} --sidecar {output.sidecar} > {log} 2>&1"
