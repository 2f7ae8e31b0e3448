# The embedded demo's inputs under resources/demo/ (built only when config points there).
# Runs are defined in config.yaml under demo.runs: name -> {base, r, alpha, lr, steps, ...}.


rule build_demo_data:
    output:
        train_jsonl="resources/demo/data/train.jsonl",
        eval_jsonl="resources/demo/data/eval.jsonl",
        train_txt="resources/demo/data/train.txt",
        eval_txt="resources/demo/data/eval.txt",
        info="resources/demo/data/dataset_info.json",
    log:
        "logs/build_demo_data.log",
    conda:
        "../envs/torch.yaml"
    shell:
        "lora2gguf demo data resources/demo/data > {log} 2>&1"


rule build_demo_tiny_base:
    output:
        directory("resources/demo/bases/tiny-qwen2"),
    log:
        "logs/build_demo_tiny_base.log",
    benchmark:
        "benchmarks/build_demo_tiny_base.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "lora2gguf demo tiny-base {output} --seed 0 > {log} 2>&1"


rule build_demo_smollm2_base:
    output:
        directory("resources/demo/bases/smollm2-135m"),
    log:
        "logs/build_demo_smollm2_base.log",
    benchmark:
        "benchmarks/build_demo_smollm2_base.tsv"
    conda:
        "../envs/torch.yaml"
    shell:
        "lora2gguf demo smollm2-base {output} --dtype float32 > {log} 2>&1"


rule build_demo_lora_run:
    input:
        base=demo_run_base,
        train="resources/demo/data/train.jsonl",
        eval="resources/demo/data/eval.jsonl",
    output:
        directory("resources/demo/runs/{run}"),
    log:
        "logs/build_demo_lora_run/{run}.log",
    benchmark:
        "benchmarks/build_demo_lora_run/{run}.tsv"
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
