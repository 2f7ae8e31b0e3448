# Conversion of the merged HF folder to GGUF: lora2gguf's own converter (gguf-py, no torch) for the architectures
# it knows, llama.cpp's convert_hf_to_gguf.py for the others (config convert.backend).
# The log ends with the tensor count, file size, time and peak memory of the conversion.
rule convert_gguf:
    input:
        model=MERGED_DIR,
        template=carried_template,
    output:
        gguf=F16_GGUF,
    log:
        LOGS["convert_gguf"],
    benchmark:
        BENCHMARKS["convert_gguf"]
    conda:
        "../envs/gguf.yaml"
    params:
        outtype=config["convert"]["outtype"],
        backend=config["convert"]["backend"],
        base=lambda wildcards: Path(candidate_base(wildcards)).name,
        adapter=lambda wildcards: wildcards.model,
        template=lambda wildcards, input: option_for("--chat-template", input.template),
    shell:
        "lora2gguf convert {input.model:q} {output.gguf:q} --outtype {params.outtype} --backend {params.backend:q}"
        " --base-model {params.base:q} --adapter {params.adapter:q} --name {wildcards.model}"
        " {params.template} > {log} 2>&1"
