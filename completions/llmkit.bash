# llmkit bash completion, generated from the app by `llmkit completions bash`
__llmkit_colon() {
    if declare -F __ltrim_colon_completions >/dev/null 2>&1; then
        __ltrim_colon_completions "$cur"
    fi
}
_llmkit() {
    local cur prev
    # Model names contain ':', which bash splits words on; bash-completion can rejoin.
    if declare -F _get_comp_words_by_ref >/dev/null 2>&1; then
        _get_comp_words_by_ref -n : cur prev
    else
        cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    fi
    local cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -*) ;;
            *) cmd="${COMP_WORDS[i]}"; break ;;
        esac
    done
    local models="smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout"
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "run chat list show import rm pull convert quantize doctor completions --version -h --help" -- "$cur"))
        return
    fi
    case "$cmd" in
        run)
            case "$prev" in
                -m|--model) COMPREPLY=($(compgen -W "$models" -- "$cur") $(compgen -f -X "!*.gguf" -- "$cur")); __llmkit_colon; return ;;
                -s|--system) COMPREPLY=(); return ;;
                --temperature) COMPREPLY=(); return ;;
                --top-p) COMPREPLY=(); return ;;
                --seed) COMPREPLY=(); return ;;
                -n|--max-tokens) COMPREPLY=(); return ;;
                -c|--ctx) COMPREPLY=(); return ;;
                -f|--format) COMPREPLY=($(compgen -W "text json" -- "$cur")); return ;;
                --json-schema) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu gpu" -- "$cur")); return ;;
                --gpu-layers) COMPREPLY=(); return ;;
                -t|--threads) COMPREPLY=(); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-m --model -s --system --temperature --top-p --seed -n --max-tokens -c --ctx -f --format --json-schema --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help" -- "$cur"))
            fi
            ;;
        chat)
            case "$prev" in
                -m|--model) COMPREPLY=($(compgen -W "$models" -- "$cur") $(compgen -f -X "!*.gguf" -- "$cur")); __llmkit_colon; return ;;
                -s|--system) COMPREPLY=(); return ;;
                --temperature) COMPREPLY=(); return ;;
                --top-p) COMPREPLY=(); return ;;
                --seed) COMPREPLY=(); return ;;
                -n|--max-tokens) COMPREPLY=(); return ;;
                -c|--ctx) COMPREPLY=(); return ;;
                --load) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --device) COMPREPLY=($(compgen -W "auto cpu gpu" -- "$cur")); return ;;
                --gpu-layers) COMPREPLY=(); return ;;
                -t|--threads) COMPREPLY=(); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-m --model -s --system --temperature --top-p --seed -n --max-tokens -c --ctx --load --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help" -- "$cur"))
            fi
            ;;
        list)
            case "$prev" in
                -f|--format) COMPREPLY=($(compgen -W "table json" -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-f --format --present -h --help" -- "$cur"))
            fi
            ;;
        show)
            case "$prev" in
                -f|--format) COMPREPLY=($(compgen -W "text json" -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-f --format -h --help" -- "$cur"))
            else
                COMPREPLY=($(compgen -W "$models" -- "$cur") $(compgen -f -X "!*.gguf" -- "$cur")); __llmkit_colon
            fi
            ;;
        import)
            case "$prev" in
                --name) COMPREPLY=(); return ;;
                --mmproj) COMPREPLY=($(compgen -f -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "--name --mmproj --force -h --help" -- "$cur"))
            else
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            ;;
        rm)
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-h --help" -- "$cur"))
            fi
            ;;
        pull)
            case "$prev" in
                --quant) COMPREPLY=(); return ;;
                -f|--format) COMPREPLY=($(compgen -W "text json" -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "--quant -f --format -q --quiet -h --help" -- "$cur"))
            else
                COMPREPLY=($(compgen -W "$models" -- "$cur") $(compgen -f -X "!*.gguf" -- "$cur")); __llmkit_colon
            fi
            ;;
        convert)
            case "$prev" in
                -o|--output) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                --outtype) COMPREPLY=(); return ;;
                -f|--format) COMPREPLY=($(compgen -W "text json" -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-o --output --outtype --force -f --format -q --quiet -h --help" -- "$cur"))
            fi
            ;;
        quantize)
            case "$prev" in
                --type) COMPREPLY=(); return ;;
                -t|--threads) COMPREPLY=(); return ;;
                --imatrix) COMPREPLY=($(compgen -f -- "$cur")); return ;;
                -f|--format) COMPREPLY=($(compgen -W "text json" -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "--type -t --threads --force --imatrix -f --format -q --quiet -h --help" -- "$cur"))
            else
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            ;;
        doctor)
            case "$prev" in
                -f|--format) COMPREPLY=($(compgen -W "text json" -- "$cur")); return ;;
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-f --format -h --help" -- "$cur"))
            fi
            ;;
        completions)
            case "$prev" in
            esac
            if [[ "$cur" == -* ]]; then
                COMPREPLY=($(compgen -W "-h --help" -- "$cur"))
            fi
            ;;
    esac
}
complete -o filenames -F _llmkit llmkit
