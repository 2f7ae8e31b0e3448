# Deployment of the best model: its Ollama Modelfile and the commands for each runtime (deploy_model),
# then the proof that what a server renders from the chat template is what training saw, and that a
# served answer is llama.cpp's own (check_chat_parity; it starts `lora2gguf serve` on 127.0.0.1).


rule deploy_model:
    input:
        gguf=deploy_gguf,
        merged=MERGED_DIR,
        template=carried_template,
    output:
        modelfile=MODELFILE,
        notes=report(
            DEPLOY_NOTES,
            caption="../report/deploy.rst",
            category="Deploy",
            subcategory="{model}",
        ),
        report=DEPLOY_REPORT,
    log:
        LOGS["deploy_model"],
    benchmark:
        BENCHMARKS["deploy_model"]
    conda:
        "../envs/gguf.yaml"
    params:
        template=lambda wildcards, input: option_for("--chat-template", input.template),
    shell:
        "lora2gguf deploy {input.gguf:q} --modelfile {output.modelfile:q} --notes {output.notes:q}"
        " --report {output.report:q} --merged {input.merged:q} {params.template}"
        " --name {wildcards.model} > {log} 2>&1"


rule check_chat_parity:
    input:
        merged=MERGED_DIR,
        gguf=deploy_gguf,
        modelfile=MODELFILE,
        training_template=training_template,
    output:
        report=report(
            CHAT_PARITY,
            caption="../report/chat_parity.rst",
            category="Deploy",
            subcategory="{model}",
        ),
    log:
        LOGS["check_chat_parity"],
    benchmark:
        BENCHMARKS["check_chat_parity"]
    conda:
        "../envs/deploy.yaml"
    threads: config["deploy"]["threads"]
    params:
        prompts=json.dumps(config["test_prompts"], ensure_ascii=False),
        max_new_tokens=config["deploy"]["max_new_tokens"],
        training=lambda wildcards, input: option_for(
            "--training-template", input.training_template
        ),
    shell:
        "lora2gguf chat-parity --merged {input.merged:q} --gguf {input.gguf:q}"
        " --modelfile {input.modelfile:q} --prompts {params.prompts:q} {params.training}"
        " --max-new-tokens {params.max_new_tokens} --threads {threads}"
        " --out {output.report:q} > {log} 2>&1"
