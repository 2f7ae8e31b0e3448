# The embedded demo's inputs under resources/demo/ (built only when config points there).
# Runs are defined in config.yaml under demo.runs: name -> {base, r, alpha, lr, steps, ...}; while the
# demo is enabled and no candidate is named, they are the candidates (rules/common.smk, apply_demo_defaults).


rule build_demo_data:
    output:
        train_jsonl=DEMO_TRAIN_JSONL,
        eval_jsonl=DEMO_EVAL_JSONL,
        train_txt=DEMO_TRAIN_TEXT,
        eval_txt=DEMO_EVAL_TEXT,
        info=DEMO_DATA_INFO,
    log:
        LOGS["build_demo_data"],
    conda:
        "../envs/torch.yaml"
    # layout.DEMO_DATA_DIR written out: Snakemake reruns a job whose shell text changes.
    shell:
        "lora2gguf demo data resources/demo/data > {log} 2>&1"


rule build_demo_tiny_base:
    output:
        directory(DEMO_TINY_BASE),
    log:
        LOGS["build_demo_tiny_base"],
    benchmark:
        BENCHMARKS["build_demo_tiny_base"]
    conda:
        "../envs/torch.yaml"
    shell:
        "lora2gguf demo tiny-base {output} --seed 0 > {log} 2>&1"


rule build_demo_smollm2_base:
    output:
        directory(DEMO_SMOLLM2_BASE),
    log:
        LOGS["build_demo_smollm2_base"],
    benchmark:
        BENCHMARKS["build_demo_smollm2_base"]
    conda:
        "../envs/torch.yaml"
    shell:
        "lora2gguf demo smollm2-base {output} --dtype float32 > {log} 2>&1"


rule build_demo_lora_run:
    input:
        base=demo_run_base,
        train=DEMO_TRAIN_JSONL,
        eval=DEMO_EVAL_JSONL,
    output:
        directory(DEMO_RUN),
    log:
        LOGS["build_demo_lora_run"],
    benchmark:
        BENCHMARKS["build_demo_lora_run"]
    conda:
        "../envs/torch.yaml"
    threads: 2
    params:
        run=demo_run,
        data=lambda wildcards, input: Path(input.train).parent,
    shell:
        "lora2gguf demo train --base {input.base} --out {output} --data {params.data}"
        " --r {params.run[r]} --alpha {params.run[alpha]} --lr {params.run[lr]}"
        " --steps {params.run[steps]} --batch-size {params.run[batch_size]}"
        " --max-length {params.run[max_length]} --seed {params.run[seed]}"
        " --threads {threads} > {log} 2>&1"
