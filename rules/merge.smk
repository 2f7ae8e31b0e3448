# Merge of the chosen LoRA adapter into its base (lora2gguf merge: peft merge_and_unload(safe_merge=True)),
# verified tensor by tensor against base + update and against the unmerged model on a fixed batch of the evaluation text.
# A QLoRA run (candidates.<name>.trained_on, or its run folder's record) is merged per merge.qlora_target, measured against the trained
# model. The report carries the logit differences, tolerance, time, peak memory, versions and input sha256s;
# a failed check writes nothing.
rule merge_adapter:
    input:
        base=base_inputs,
        run=run_inputs,
        eval_text=config["evaluation"]["text"],
    output:
        model=directory(MERGED_DIR),
        report=MERGE_REPORT,
    log:
        LOGS["merge_adapter"],
    benchmark:
        BENCHMARKS["merge_adapter"]
    conda:
        "../envs/torch.yaml"
    threads: 2
    params:
        base=candidate_base,
        run=candidate_run,
        dtype=config["merge"]["dtype"],
        device=config["merge"]["device"],
        shard_size=config["merge"]["shard_size"],
        flags=" ".join(
            flag
            for flag, on in (
                ("--allow-pickle", config["merge"]["allow_pickle"]),
                ("--trust-remote-code", config["merge"]["trust_remote_code"]),
            )
            if on
        ),
        qlora_target=config["merge"].get("qlora_target", "auto"),
        trained_on=trained_on_arg,
    shell:
        "OMP_NUM_THREADS={threads} lora2gguf merge --base {params.base:q} --adapter {params.run:q}"
        " --out {output.model:q} --dtype {params.dtype} --device {params.device}"
        " --shard-size {params.shard_size:q} --report {output.report:q} --eval-text {input.eval_text:q}"
        " --qlora-target {params.qlora_target} {params.trained_on} {params.flags} > {log} 2>&1"
