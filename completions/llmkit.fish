# llmkit fish completion, generated from the app by `llmkit completions fish`
# Static: completing a word never starts llmkit. Install it as
# ~/.config/fish/completions/llmkit.fish.

function __llmkit_subcommands --argument-names path
    switch $path
        case ''
            printf '%s\n' 'run' 'chat' 'caption' 'summarize' 'check' 'serve' 'list' 'show' 'import' 'rm' 'pull' 'convert' 'quantize' 'doctor' 'completions'
    end
end

# How many values option $argv[2] of path $argv[1] takes.
function __llmkit_nargs --argument-names path opt
    switch "$path $opt"
        case 'run -m' 'run --model' 'run -s' 'run --system' 'run --temperature' 'run --top-p' 'run --seed' 'run -n' 'run --max-tokens' 'run -c' 'run --ctx' 'run -f' 'run --format' 'run --json-schema' 'run -i' 'run --image' 'run --mmproj' 'run --guard-model' 'run --guard-threshold' 'run --device' 'run --gpu-layers' 'run -t' 'run --threads' 'chat -m' 'chat --model' 'chat -s' 'chat --system' 'chat --temperature' 'chat --top-p' 'chat --seed' 'chat -n' 'chat --max-tokens' 'chat -c' 'chat --ctx' 'chat --load' 'chat -i' 'chat --image' 'chat --mmproj' 'chat --guard-model' 'chat --guard-threshold' 'chat --device' 'chat --gpu-layers' 'chat -t' 'chat --threads' 'caption -m' 'caption --model' 'caption --mmproj' 'caption -p' 'caption --prompt' 'caption --style' 'caption -f' 'caption --format' 'caption -o' 'caption --out' 'caption --sidecar-ext' 'caption -n' 'caption --max-tokens' 'caption --temperature' 'caption --top-p' 'caption --seed' 'caption --max-side' 'caption -c' 'caption --ctx' 'caption -P' 'caption --parallel' 'caption --guard-model' 'caption --guard-threshold' 'caption --device' 'caption --gpu-layers' 'caption -t' 'caption --threads' 'summarize -m' 'summarize --model' 'summarize -l' 'summarize --length' 'summarize -w' 'summarize --words' 'summarize --style' 'summarize --focus' 'summarize --language' 'summarize --as' 'summarize --max-bytes' 'summarize -f' 'summarize --format' 'summarize -o' 'summarize --out' 'summarize -s' 'summarize --system' 'summarize --temperature' 'summarize --top-p' 'summarize --seed' 'summarize -n' 'summarize --max-tokens' 'summarize -c' 'summarize --ctx' 'summarize -P' 'summarize --parallel' 'summarize --guard-model' 'summarize --guard-threshold' 'summarize --device' 'summarize --gpu-layers' 'summarize -t' 'summarize --threads' 'check -m' 'check --model' 'check --file' 'check --prompt' 'check --response' 'check --conversation' 'check --batch' 'check -i' 'check --image' 'check --exclude' 'check --categories' 'check --threshold' 'check -f' 'check --format' 'check -c' 'check --ctx' 'check -P' 'check --parallel' 'check --device' 'check --gpu-layers' 'check -t' 'check --threads' 'serve -m' 'serve --model' 'serve --host' 'serve -p' 'serve --port' 'serve -P' 'serve --parallel' 'serve --api-key' 'serve --guard-model' 'serve --guard-threshold' 'serve --queue' 'serve -n' 'serve --max-tokens' 'serve --max-body' 'serve --allow-files' 'serve --max-image-pixels' 'serve --timeout' 'serve --shutdown-timeout' 'serve -c' 'serve --ctx' 'serve --device' 'serve --gpu-layers' 'serve -t' 'serve --threads' 'list -f' 'list --format' 'show -f' 'show --format' 'import --name' 'import --mmproj' 'pull --quant' 'pull -t' 'pull --threads' 'pull -f' 'pull --format' 'convert -o' 'convert --output' 'convert --mmproj' 'convert --outtype' 'convert -f' 'convert --format' 'quantize --type' 'quantize -t' 'quantize --threads' 'quantize --imatrix' 'quantize -f' 'quantize --format' 'doctor -f' 'doctor --format'
            echo 1
            return
    end
    echo 0
end

# Prints how many positional words the command at the cursor has, then its path.
function __llmkit_state
    set -l tokens (commandline -opc)
    set -e tokens[1]
    set -l path ''
    set -l pos 0
    set -l skip 0
    set -l dashdash 0
    for t in $tokens
        if test $skip -gt 0
            set skip (math $skip - 1)
            continue
        end
        if test $dashdash -eq 0
            switch $t
                case --
                    set dashdash 1
                    continue
                case '-*=*'
                    continue
                case '-*'
                    set skip (__llmkit_nargs "$path" $t)
                    continue
            end
        end
        if test $dashdash -eq 0; and contains -- $t (__llmkit_subcommands "$path")
            set path (string trim -- "$path $t")
            set pos 0
        else
            set pos (math $pos + 1)
        end
    end
    echo $pos
    echo $path
end

# True when the cursor is in the command whose path is $argv.
function __llmkit_at
    set -l state (__llmkit_state)
    set -l want (string join ' ' -- $argv)
    test "$state[2]" = "$want"
end

# True when the cursor is at positional argument $argv[2] ("N+": N or later) of path $argv[1].
function __llmkit_arg --argument-names path index
    set -l state (__llmkit_state)
    test "$state[2]" = "$path"; or return 1
    switch $index
        case '*+'
            test $state[1] -ge (string replace '+' '' -- $index)
        case '*'
            test $state[1] -eq $index
    end
end

complete -c llmkit -f
complete -c llmkit -n '__llmkit_at' -a 'run' -d 'Answer one prompt and exit'
complete -c llmkit -n '__llmkit_at' -a 'chat' -d 'Chat with a model. Piped stdin is sent as one message and the answer printed'
complete -c llmkit -n '__llmkit_at' -a 'caption' -d 'Caption images with a vision model; the model is loaded once for the whole batch'
complete -c llmkit -n '__llmkit_at' -a 'summarize' -d 'Summarize documents of any length; long ones are split, summarized and merged'
complete -c llmkit -n '__llmkit_at' -a 'check' -d 'Check a prompt, a response or a conversation against a safety policy (Llama Guard 3)'
complete -c llmkit -n '__llmkit_at' -a 'serve' -d 'Serve models over HTTP with OpenAI\'s API, until Ctrl-C or SIGTERM (then the requests'
complete -c llmkit -n '__llmkit_at' -a 'list' -d 'List catalog models and local models side by side'
complete -c llmkit -n '__llmkit_at' -a 'show' -d 'Print a model\'s GGUF metadata: architecture, parameters, quantization, context, template'
complete -c llmkit -n '__llmkit_at' -a 'import' -d 'Register a local GGUF under a name (the file stays where it is)'
complete -c llmkit -n '__llmkit_at' -a 'rm' -d 'Unregister a local model (files llmkit downloaded or wrote are deleted)'
complete -c llmkit -n '__llmkit_at' -a 'pull' -d 'Download a model\'s GGUF into the Hugging Face cache and register it'
complete -c llmkit -n '__llmkit_at' -a 'convert' -d 'Convert a Hugging Face checkpoint (safetensors) to GGUF, without torch'
complete -c llmkit -n '__llmkit_at' -a 'quantize' -d 'Quantize a GGUF with llama.cpp\'s own quantizer; the result is loaded once to check it'
complete -c llmkit -n '__llmkit_at' -a 'doctor' -d 'Print versions, the llama.cpp backend, GPU offload, threads, paths and models present'
complete -c llmkit -n '__llmkit_at' -a 'completions' -d 'Print a static completion script for your shell'
complete -c llmkit -n '__llmkit_at' -l 'version' -d 'Print the version and exit'
complete -c llmkit -n '__llmkit_at' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at run' -s 'm' -l 'model' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)' -d 'Catalog name (llama3.2:1b), local name, or path to a .gguf file'
complete -c llmkit -n '__llmkit_at run' -s 's' -l 'system' -x -d 'System prompt'
complete -c llmkit -n '__llmkit_at run' -l 'temperature' -x -d 'Sampling temperature; 0 is greedy (default: the model\'s, else 0.8)'
complete -c llmkit -n '__llmkit_at run' -l 'top-p' -x -d 'Nucleus sampling (default: the model\'s, else 0.95)'
complete -c llmkit -n '__llmkit_at run' -l 'seed' -x -d 'Random seed for repeatable output'
complete -c llmkit -n '__llmkit_at run' -s 'n' -l 'max-tokens' -x -d 'Most tokens to generate; 0 = until the context is full'
complete -c llmkit -n '__llmkit_at run' -s 'c' -l 'ctx' -x -d 'Context size in tokens (default: min(4096, the model\'s))'
complete -c llmkit -n '__llmkit_at run' -s 'f' -l 'format' -x -a 'text json' -d 'text streams the answer; json prints one result object'
complete -c llmkit -n '__llmkit_at run' -l 'json-schema' -r -F -d 'Constrain the answer to JSON matching this schema file'
complete -c llmkit -n '__llmkit_at run' -s 'i' -l 'image' -r -F -d 'An image to ask about (repeat for several); needs a vision model'
complete -c llmkit -n '__llmkit_at run' -l 'mmproj' -r -F -d 'Vision projector GGUF (default: the model\'s own, or the one mmproj-*.gguf beside it)'
complete -c llmkit -n '__llmkit_at run' -l 'guard' -d 'Check the input before and the output after with a safety model; flagged output is withheld (exit 3)'
complete -c llmkit -n '__llmkit_at run' -l 'guard-model' -x -d 'The safety model for --guard (default llama-guard3:1b); implies --guard'
complete -c llmkit -n '__llmkit_at run' -l 'guard-threshold' -x -d 'Flag when the safety model\'s P(unsafe) reaches this, instead of taking its answer'
complete -c llmkit -n '__llmkit_at run' -l 'device' -x -a 'auto cpu gpu' -d 'auto: GPU when llama.cpp has one'
complete -c llmkit -n '__llmkit_at run' -l 'gpu-layers' -x -d 'Layers to offload to the GPU (default: all when offloading)'
complete -c llmkit -n '__llmkit_at run' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at run' -s 'v' -l 'verbose' -d 'Show llama.cpp\'s log on stderr'
complete -c llmkit -n '__llmkit_at run' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at run' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at chat' -s 'm' -l 'model' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)' -d 'Catalog name (llama3.2:1b), local name, or path to a .gguf file'
complete -c llmkit -n '__llmkit_at chat' -s 's' -l 'system' -x -d 'System prompt'
complete -c llmkit -n '__llmkit_at chat' -l 'temperature' -x -d 'Sampling temperature; 0 is greedy (default: the model\'s, else 0.8)'
complete -c llmkit -n '__llmkit_at chat' -l 'top-p' -x -d 'Nucleus sampling (default: the model\'s, else 0.95)'
complete -c llmkit -n '__llmkit_at chat' -l 'seed' -x -d 'Random seed for repeatable output'
complete -c llmkit -n '__llmkit_at chat' -s 'n' -l 'max-tokens' -x -d 'Most tokens to generate; 0 = until the context is full'
complete -c llmkit -n '__llmkit_at chat' -s 'c' -l 'ctx' -x -d 'Context size in tokens (default: min(4096, the model\'s))'
complete -c llmkit -n '__llmkit_at chat' -l 'load' -r -F -d 'Start from a conversation saved with /save'
complete -c llmkit -n '__llmkit_at chat' -s 'i' -l 'image' -r -F -d 'An image to ask about (repeat for several); needs a vision model'
complete -c llmkit -n '__llmkit_at chat' -l 'mmproj' -r -F -d 'Vision projector GGUF (default: the model\'s own, or the one mmproj-*.gguf beside it)'
complete -c llmkit -n '__llmkit_at chat' -l 'guard' -d 'Check the input before and the output after with a safety model; flagged output is withheld (exit 3)'
complete -c llmkit -n '__llmkit_at chat' -l 'guard-model' -x -d 'The safety model for --guard (default llama-guard3:1b); implies --guard'
complete -c llmkit -n '__llmkit_at chat' -l 'guard-threshold' -x -d 'Flag when the safety model\'s P(unsafe) reaches this, instead of taking its answer'
complete -c llmkit -n '__llmkit_at chat' -l 'device' -x -a 'auto cpu gpu' -d 'auto: GPU when llama.cpp has one'
complete -c llmkit -n '__llmkit_at chat' -l 'gpu-layers' -x -d 'Layers to offload to the GPU (default: all when offloading)'
complete -c llmkit -n '__llmkit_at chat' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at chat' -s 'v' -l 'verbose' -d 'Show llama.cpp\'s log on stderr'
complete -c llmkit -n '__llmkit_at chat' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at chat' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at caption' -s 'm' -l 'model' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)' -d 'Catalog name (llama3.2:1b), local name, or path to a .gguf file'
complete -c llmkit -n '__llmkit_at caption' -l 'mmproj' -r -F -d 'Vision projector GGUF (default: the model\'s own, or the one mmproj-*.gguf beside it)'
complete -c llmkit -n '__llmkit_at caption' -s 'p' -l 'prompt' -x -d 'Your own instruction instead of a --style'
complete -c llmkit -n '__llmkit_at caption' -l 'style' -x -a 'short detailed alt-text tags' -d 'short: one sentence; detailed; alt-text: under 125 characters for screen readers; tags: comma-separated keywords'
complete -c llmkit -n '__llmkit_at caption' -s 'r' -l 'recursive' -d 'Look into subdirectories too'
complete -c llmkit -n '__llmkit_at caption' -s 'f' -l 'format' -x -a 'text json jsonl' -d 'text (default), json (one array at the end) or jsonl (one record per image as it finishes)'
complete -c llmkit -n '__llmkit_at caption' -s 'o' -l 'out' -r -F -d 'Append one JSON record per image to this JSONL file as each finishes'
complete -c llmkit -n '__llmkit_at caption' -l 'sidecar' -d 'Write each caption next to its image (photo.jpg → photo.txt; photo.jpg.txt when photo.png is there too); never over an input'
complete -c llmkit -n '__llmkit_at caption' -l 'sidecar-ext' -x -d 'Extension of sidecar files (implies --sidecar)'
complete -c llmkit -n '__llmkit_at caption' -l 'skip-existing' -d 'Skip images already done: with a sidecar (--sidecar) and a record in --out (--out), whichever were asked for'
complete -c llmkit -n '__llmkit_at caption' -s 'n' -l 'max-tokens' -x -d 'Most tokens per caption (default: by style, 64–512)'
complete -c llmkit -n '__llmkit_at caption' -l 'temperature' -x -d 'Sampling temperature; 0 is greedy (default: the model\'s, else 0.8)'
complete -c llmkit -n '__llmkit_at caption' -l 'top-p' -x -d 'Nucleus sampling (default: the model\'s, else 0.95)'
complete -c llmkit -n '__llmkit_at caption' -l 'seed' -x -d 'Random seed for repeatable output'
complete -c llmkit -n '__llmkit_at caption' -l 'max-side' -x -d 'Downscale images whose longest side is larger'
complete -c llmkit -n '__llmkit_at caption' -s 'c' -l 'ctx' -x -d 'Context size in tokens (default: min(4096, the model\'s))'
complete -c llmkit -n '__llmkit_at caption' -s 'P' -l 'parallel' -x -d 'Items decoded together, each with its own --ctx (default: 4 on CPU, 8 on a GPU; 1 is one at a time)'
complete -c llmkit -n '__llmkit_at caption' -l 'guard' -d 'Check the input before and the output after with a safety model; flagged output is withheld (exit 3)'
complete -c llmkit -n '__llmkit_at caption' -l 'guard-model' -x -d 'The safety model for --guard (default llama-guard3:1b); implies --guard'
complete -c llmkit -n '__llmkit_at caption' -l 'guard-threshold' -x -d 'Flag when the safety model\'s P(unsafe) reaches this, instead of taking its answer'
complete -c llmkit -n '__llmkit_at caption' -l 'device' -x -a 'auto cpu gpu' -d 'auto: GPU when llama.cpp has one'
complete -c llmkit -n '__llmkit_at caption' -l 'gpu-layers' -x -d 'Layers to offload to the GPU (default: all when offloading)'
complete -c llmkit -n '__llmkit_at caption' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at caption' -s 'v' -l 'verbose' -d 'Show llama.cpp\'s log on stderr'
complete -c llmkit -n '__llmkit_at caption' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at caption' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at summarize' -s 'm' -l 'model' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)' -d 'Catalog name (llama3.2:1b), local name, or path to a .gguf file'
complete -c llmkit -n '__llmkit_at summarize' -s 'l' -l 'length' -x -a 'short medium long' -d 'short (~50 words), medium (~120) or long (~300)'
complete -c llmkit -n '__llmkit_at summarize' -s 'w' -l 'words' -x -d 'About this many words (instead of --length)'
complete -c llmkit -n '__llmkit_at summarize' -l 'style' -x -a 'paragraph bullets tldr headline' -d 'paragraph, bullets, tldr (one or two sentences) or headline'
complete -c llmkit -n '__llmkit_at summarize' -l 'focus' -x -d 'Aim the summary at a question or topic'
complete -c llmkit -n '__llmkit_at summarize' -l 'language' -x -d 'Write the summary in this language'
complete -c llmkit -n '__llmkit_at summarize' -l 'as' -x -a 'text markdown html pdf' -d 'Read inputs as this format (default: from the name or the content)'
complete -c llmkit -n '__llmkit_at summarize' -s 'r' -l 'recursive' -d 'Look into subdirectories too'
complete -c llmkit -n '__llmkit_at summarize' -l 'max-bytes' -x -d 'Refuse documents larger than this, e.g. 100M (k, M, G: binary units)'
complete -c llmkit -n '__llmkit_at summarize' -s 'f' -l 'format' -x -a 'text json jsonl' -d 'text (default), json (one array at the end) or jsonl (one record per document as it finishes)'
complete -c llmkit -n '__llmkit_at summarize' -s 'o' -l 'out' -r -F -d 'Append one JSON record per document to this JSONL file'
complete -c llmkit -n '__llmkit_at summarize' -l 'skip-existing' -d 'Skip documents that already have a record in --out'
complete -c llmkit -n '__llmkit_at summarize' -s 's' -l 'system' -x -d 'System prompt'
complete -c llmkit -n '__llmkit_at summarize' -l 'temperature' -x -d 'Sampling temperature; 0 is greedy (default: the model\'s, else 0.8)'
complete -c llmkit -n '__llmkit_at summarize' -l 'top-p' -x -d 'Nucleus sampling (default: the model\'s, else 0.95)'
complete -c llmkit -n '__llmkit_at summarize' -l 'seed' -x -d 'Random seed for repeatable output'
complete -c llmkit -n '__llmkit_at summarize' -s 'n' -l 'max-tokens' -x -d 'Most tokens in the final summary (default: from the length)'
complete -c llmkit -n '__llmkit_at summarize' -s 'c' -l 'ctx' -x -d 'Context size in tokens (default: min(4096, the model\'s))'
complete -c llmkit -n '__llmkit_at summarize' -s 'P' -l 'parallel' -x -d 'Items decoded together, each with its own --ctx (default: 4 on CPU, 8 on a GPU; 1 is one at a time)'
complete -c llmkit -n '__llmkit_at summarize' -l 'guard' -d 'Check the input before and the output after with a safety model; flagged output is withheld (exit 3)'
complete -c llmkit -n '__llmkit_at summarize' -l 'guard-model' -x -d 'The safety model for --guard (default llama-guard3:1b); implies --guard'
complete -c llmkit -n '__llmkit_at summarize' -l 'guard-threshold' -x -d 'Flag when the safety model\'s P(unsafe) reaches this, instead of taking its answer'
complete -c llmkit -n '__llmkit_at summarize' -l 'device' -x -a 'auto cpu gpu' -d 'auto: GPU when llama.cpp has one'
complete -c llmkit -n '__llmkit_at summarize' -l 'gpu-layers' -x -d 'Layers to offload to the GPU (default: all when offloading)'
complete -c llmkit -n '__llmkit_at summarize' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at summarize' -s 'v' -l 'verbose' -d 'Show llama.cpp\'s log on stderr'
complete -c llmkit -n '__llmkit_at summarize' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at summarize' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at check' -s 'm' -l 'model' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)' -d 'Catalog name (llama3.2:1b), local name, or path to a .gguf file'
complete -c llmkit -n '__llmkit_at check' -l 'file' -r -F -d 'Check the text of this file'
complete -c llmkit -n '__llmkit_at check' -l 'prompt' -x -d 'The user prompt (with --response: the context of the response)'
complete -c llmkit -n '__llmkit_at check' -l 'response' -x -d 'Check this assistant response (in the context of --prompt)'
complete -c llmkit -n '__llmkit_at check' -l 'conversation' -r -F -d 'A JSON file of {role, content} messages; the last one is checked'
complete -c llmkit -n '__llmkit_at check' -l 'batch' -x -d 'A JSONL file (or - for stdin) of {"text"} or {"prompt", "response"} records, each with an optional "image" path; one verdict line each'
complete -c llmkit -n '__llmkit_at check' -s 'i' -l 'image' -r -F -d 'Check this picture together with the text (or alone); needs a guard that reads images (llama-guard3:11b-vision)'
complete -c llmkit -n '__llmkit_at check' -l 'exclude' -x -d 'Leave these categories out, e.g. S7,S8'
complete -c llmkit -n '__llmkit_at check' -l 'categories' -r -F -d 'Your own policy: a TOML file of [[categories]] (code, name, description)'
complete -c llmkit -n '__llmkit_at check' -l 'threshold' -x -d 'Flag when P(unsafe) reaches this, instead of taking the model\'s answer'
complete -c llmkit -n '__llmkit_at check' -s 'f' -l 'format' -x -a 'text json' -d 'text: safe / unsafe: S1 Violent Crimes; json: verdict, categories, score, timings'
complete -c llmkit -n '__llmkit_at check' -s 'c' -l 'ctx' -x -d 'Context size in tokens (default: min(4096, the model\'s))'
complete -c llmkit -n '__llmkit_at check' -s 'P' -l 'parallel' -x -d 'Items decoded together, each with its own --ctx (default: 4 on CPU, 8 on a GPU; 1 is one at a time)'
complete -c llmkit -n '__llmkit_at check' -l 'device' -x -a 'auto cpu gpu' -d 'auto: GPU when llama.cpp has one'
complete -c llmkit -n '__llmkit_at check' -l 'gpu-layers' -x -d 'Layers to offload to the GPU (default: all when offloading)'
complete -c llmkit -n '__llmkit_at check' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at check' -s 'v' -l 'verbose' -d 'Show llama.cpp\'s log on stderr'
complete -c llmkit -n '__llmkit_at check' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at check' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at serve' -s 'm' -l 'model' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)' -d 'Catalog name (llama3.2:1b), local name, or path to a .gguf file. Repeat to serve several; a request\'s "model" picks one'
complete -c llmkit -n '__llmkit_at serve' -l 'host' -x -d 'Address to listen on; anything but loopback needs an API key'
complete -c llmkit -n '__llmkit_at serve' -s 'p' -l 'port' -x -d 'Port (0: a free one, printed at start)'
complete -c llmkit -n '__llmkit_at serve' -s 'P' -l 'parallel' -x -d 'Items decoded together, each with its own --ctx (default: 4 on CPU, 8 on a GPU; 1 is one at a time)'
complete -c llmkit -n '__llmkit_at serve' -l 'api-key' -x -d 'Require \'Authorization: Bearer KEY\' on every route but /health'
complete -c llmkit -n '__llmkit_at serve' -l 'guard' -d 'Check every prompt and answer with a safety model (flagged: finish_reason content_filter); it also answers /v1/moderations'
complete -c llmkit -n '__llmkit_at serve' -l 'guard-model' -x -d 'The safety model for --guard (default llama-guard3:1b); implies --guard'
complete -c llmkit -n '__llmkit_at serve' -l 'guard-threshold' -x -d 'Flag when the safety model\'s P(unsafe) reaches this, instead of taking its answer'
complete -c llmkit -n '__llmkit_at serve' -l 'moderations-only' -d 'Load the safety model for /v1/moderations only; chats are not checked'
complete -c llmkit -n '__llmkit_at serve' -l 'queue' -x -d 'Requests that may wait for a model beyond --parallel (default: 8 per sequence); past it, 429 with Retry-After'
complete -c llmkit -n '__llmkit_at serve' -s 'n' -l 'max-tokens' -x -d 'The most tokens one answer may ask for (default: what its context holds)'
complete -c llmkit -n '__llmkit_at serve' -l 'max-body' -x -d 'The largest request body, in MiB (413 past it)'
complete -c llmkit -n '__llmkit_at serve' -l 'allow-files' -r -F -d 'Let image_url name files in this folder (by default only data: URLs are read; nothing is ever fetched)'
complete -c llmkit -n '__llmkit_at serve' -l 'max-image-pixels' -x -d 'The most pixels an image may have (400 past it)'
complete -c llmkit -n '__llmkit_at serve' -l 'timeout' -x -d 'Seconds a request may take, queued and generating (504 past it)'
complete -c llmkit -n '__llmkit_at serve' -l 'shutdown-timeout' -x -d 'On SIGINT/SIGTERM, seconds to let requests in flight finish before ending them'
complete -c llmkit -n '__llmkit_at serve' -s 'c' -l 'ctx' -x -d 'Context size in tokens (default: min(4096, the model\'s))'
complete -c llmkit -n '__llmkit_at serve' -l 'device' -x -a 'auto cpu gpu' -d 'auto: GPU when llama.cpp has one'
complete -c llmkit -n '__llmkit_at serve' -l 'gpu-layers' -x -d 'Layers to offload to the GPU (default: all when offloading)'
complete -c llmkit -n '__llmkit_at serve' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at serve' -s 'v' -l 'verbose' -d 'Show llama.cpp\'s log on stderr'
complete -c llmkit -n '__llmkit_at serve' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at serve' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at list' -s 'f' -l 'format' -x -a 'table json' -d 'table (default on a terminal) or json'
complete -c llmkit -n '__llmkit_at list' -l 'present' -d 'Only models on this machine'
complete -c llmkit -n '__llmkit_at list' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at show' -s 'f' -l 'format' -x -a 'text json' -d ''
complete -c llmkit -n '__llmkit_at show' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_arg \'show\' 0' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)'
complete -c llmkit -n '__llmkit_at import' -l 'name' -x -d 'Name to use it by, e.g. mymodel:q4'
complete -c llmkit -n '__llmkit_at import' -l 'mmproj' -r -F -d 'Projector GGUF for a vision model'
complete -c llmkit -n '__llmkit_at import' -l 'force' -d 'Replace a model of that name'
complete -c llmkit -n '__llmkit_at import' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_arg \'import\' 0' -F
complete -c llmkit -n '__llmkit_at rm' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at pull' -l 'quant' -x -d 'Quantization to pull, e.g. Q8_0 (default: the catalog\'s)'
complete -c llmkit -n '__llmkit_at pull' -l 'from-source' -d 'Download the safetensors checkpoint, convert and quantize it with llmkit instead of fetching a prebuilt GGUF'
complete -c llmkit -n '__llmkit_at pull' -l 'keep' -d 'With --from-source: keep the intermediate f16 GGUF'
complete -c llmkit -n '__llmkit_at pull' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at pull' -s 'f' -l 'format' -x -a 'text json' -d 'json: print the registered model as one JSON object'
complete -c llmkit -n '__llmkit_at pull' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at pull' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_arg \'pull\' 0' -x -a 'smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b (__fish_complete_suffix .gguf)'
complete -c llmkit -n '__llmkit_at convert' -s 'o' -l 'output' -r -F -d 'The .gguf file to write'
complete -c llmkit -n '__llmkit_at convert' -l 'mmproj' -r -F -d 'Where a vision model\'s projector goes (default: mmproj-OUT beside OUT)'
complete -c llmkit -n '__llmkit_at convert' -l 'outtype' -x -d 'Weight type: f32, f16, bf16 or q8_0 (norms stay f32)'
complete -c llmkit -n '__llmkit_at convert' -l 'force' -d 'Replace OUT (and the projector) if they exist'
complete -c llmkit -n '__llmkit_at convert' -s 'f' -l 'format' -x -a 'text json' -d ''
complete -c llmkit -n '__llmkit_at convert' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at convert' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at quantize' -l 'type' -x -d 'Q4_K_M, Q8_0, Q5_K_M, IQ4_XS, …'
complete -c llmkit -n '__llmkit_at quantize' -s 't' -l 'threads' -x -d 'CPU threads, exactly (default: the physical cores other processes leave idle)'
complete -c llmkit -n '__llmkit_at quantize' -l 'force' -d 'Replace OUT if it exists'
complete -c llmkit -n '__llmkit_at quantize' -l 'imatrix' -r -F -d 'Importance matrix from llama-imatrix (needed for IQ1/IQ2 types)'
complete -c llmkit -n '__llmkit_at quantize' -s 'f' -l 'format' -x -a 'text json' -d ''
complete -c llmkit -n '__llmkit_at quantize' -s 'q' -l 'quiet' -d 'No notes or progress on stderr'
complete -c llmkit -n '__llmkit_at quantize' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_arg \'quantize\' 0' -F
complete -c llmkit -n '__llmkit_arg \'quantize\' 1' -F
complete -c llmkit -n '__llmkit_at doctor' -s 'f' -l 'format' -x -a 'text json' -d ''
complete -c llmkit -n '__llmkit_at doctor' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_at completions' -s 'h' -l 'help' -d 'Show this message and exit'
complete -c llmkit -n '__llmkit_arg \'completions\' 0' -x -a 'bash zsh fish'
