# llmkit bash completion, generated from the app by `llmkit completions bash`
# Static: completing a word never starts llmkit. Install it as
# ~/.local/share/bash-completion/completions/llmkit, or source it from ~/.bashrc.

__llmkit_model_names='smollm2:135m llama3.2:1b llama3.2:3b llama-guard3:1b llama-guard3:8b llama-guard3:11b-vision gemma3:4b qwen2.5vl:3b smolvlm2:2.2b smolvlm:2b smolvlm:500m smolvlm:256m llama4:scout llama3.2-vision:11b llama3.2-vision:90b'

# The subcommands, options and value-taking options (as NAME=COUNT) of command path $1,
# how many positional arguments it takes, and whether the last one repeats.
__llmkit_spec() {
    case "$1" in
        '')
            subs='run chat caption summarize check serve list show import rm pull convert quantize doctor completions'
            opts='--version -h --help'
            valued=''
            npos=0 variadic=0 ;;
        'run')
            subs=''
            opts='-m --model -s --system --temperature --top-p --seed -n --max-tokens -c --ctx -f --format --json-schema -i --image --mmproj --guard --guard-model --guard-threshold --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help'
            valued='-m=1 --model=1 -s=1 --system=1 --temperature=1 --top-p=1 --seed=1 -n=1 --max-tokens=1 -c=1 --ctx=1 -f=1 --format=1 --json-schema=1 -i=1 --image=1 --mmproj=1 --guard-model=1 --guard-threshold=1 --device=1 --gpu-layers=1 -t=1 --threads=1'
            npos=1 variadic=1 ;;
        'chat')
            subs=''
            opts='-m --model -s --system --temperature --top-p --seed -n --max-tokens -c --ctx --load -i --image --mmproj --guard --guard-model --guard-threshold --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help'
            valued='-m=1 --model=1 -s=1 --system=1 --temperature=1 --top-p=1 --seed=1 -n=1 --max-tokens=1 -c=1 --ctx=1 --load=1 -i=1 --image=1 --mmproj=1 --guard-model=1 --guard-threshold=1 --device=1 --gpu-layers=1 -t=1 --threads=1'
            npos=0 variadic=0 ;;
        'caption')
            subs=''
            opts='-m --model --mmproj -p --prompt --style -r --recursive -f --format -o --out --sidecar --sidecar-ext --skip-existing -n --max-tokens --temperature --top-p --seed --max-side -c --ctx -P --parallel --guard --guard-model --guard-threshold --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help'
            valued='-m=1 --model=1 --mmproj=1 -p=1 --prompt=1 --style=1 -f=1 --format=1 -o=1 --out=1 --sidecar-ext=1 -n=1 --max-tokens=1 --temperature=1 --top-p=1 --seed=1 --max-side=1 -c=1 --ctx=1 -P=1 --parallel=1 --guard-model=1 --guard-threshold=1 --device=1 --gpu-layers=1 -t=1 --threads=1'
            npos=1 variadic=1 ;;
        'summarize')
            subs=''
            opts='-m --model -l --length -w --words --style --focus --language --as -r --recursive --max-bytes -f --format -o --out --skip-existing -s --system --temperature --top-p --seed -n --max-tokens -c --ctx -P --parallel --guard --guard-model --guard-threshold --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help'
            valued='-m=1 --model=1 -l=1 --length=1 -w=1 --words=1 --style=1 --focus=1 --language=1 --as=1 --max-bytes=1 -f=1 --format=1 -o=1 --out=1 -s=1 --system=1 --temperature=1 --top-p=1 --seed=1 -n=1 --max-tokens=1 -c=1 --ctx=1 -P=1 --parallel=1 --guard-model=1 --guard-threshold=1 --device=1 --gpu-layers=1 -t=1 --threads=1'
            npos=1 variadic=1 ;;
        'check')
            subs=''
            opts='-m --model --file --prompt --response --conversation --batch -i --image --exclude --categories --threshold -f --format -c --ctx -P --parallel --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help'
            valued='-m=1 --model=1 --file=1 --prompt=1 --response=1 --conversation=1 --batch=1 -i=1 --image=1 --exclude=1 --categories=1 --threshold=1 -f=1 --format=1 -c=1 --ctx=1 -P=1 --parallel=1 --device=1 --gpu-layers=1 -t=1 --threads=1'
            npos=1 variadic=1 ;;
        'serve')
            subs=''
            opts='-m --model --host -p --port -P --parallel --api-key --guard --guard-model --guard-threshold --moderations-only --queue -n --max-tokens --max-body --allow-files --max-image-pixels --timeout --shutdown-timeout -c --ctx --device --gpu-layers -t --threads -v --verbose -q --quiet -h --help'
            valued='-m=1 --model=1 --host=1 -p=1 --port=1 -P=1 --parallel=1 --api-key=1 --guard-model=1 --guard-threshold=1 --queue=1 -n=1 --max-tokens=1 --max-body=1 --allow-files=1 --max-image-pixels=1 --timeout=1 --shutdown-timeout=1 -c=1 --ctx=1 --device=1 --gpu-layers=1 -t=1 --threads=1'
            npos=0 variadic=0 ;;
        'list')
            subs=''
            opts='-f --format --present -h --help'
            valued='-f=1 --format=1'
            npos=0 variadic=0 ;;
        'show')
            subs=''
            opts='-f --format -h --help'
            valued='-f=1 --format=1'
            npos=1 variadic=0 ;;
        'import')
            subs=''
            opts='--name --mmproj --force -h --help'
            valued='--name=1 --mmproj=1'
            npos=1 variadic=0 ;;
        'rm')
            subs=''
            opts='-h --help'
            valued=''
            npos=1 variadic=0 ;;
        'pull')
            subs=''
            opts='--quant --from-source --keep -t --threads -f --format -q --quiet -h --help'
            valued='--quant=1 -t=1 --threads=1 -f=1 --format=1'
            npos=1 variadic=0 ;;
        'convert')
            subs=''
            opts='-o --output --mmproj --outtype --force -f --format -q --quiet -h --help'
            valued='-o=1 --output=1 --mmproj=1 --outtype=1 -f=1 --format=1'
            npos=1 variadic=0 ;;
        'quantize')
            subs=''
            opts='--type -t --threads --force --imatrix -f --format -q --quiet -h --help'
            valued='--type=1 -t=1 --threads=1 --imatrix=1 -f=1 --format=1'
            npos=2 variadic=0 ;;
        'doctor')
            subs=''
            opts='-f --format -h --help'
            valued='-f=1 --format=1'
            npos=0 variadic=0 ;;
        'completions')
            subs=''
            opts='-h --help'
            valued=''
            npos=1 variadic=0 ;;
        *) subs='' opts='' valued='' npos=0 variadic=0 ;;
    esac
}

# Completes $3 as the value of option $2 (or of positional argument #N) of path $1.
__llmkit_value() {
    case "$1 $2" in
        'run -m'|'run --model') __llmkit_models "$3" ;;
        'run -f'|'run --format') __llmkit_words 'text json' "$3" ;;
        'run --json-schema') __llmkit_files "$3" ;;
        'run -i'|'run --image') __llmkit_files "$3" ;;
        'run --mmproj') __llmkit_files "$3" ;;
        'run --device') __llmkit_words 'auto cpu gpu' "$3" ;;
        'chat -m'|'chat --model') __llmkit_models "$3" ;;
        'chat --load') __llmkit_files "$3" ;;
        'chat -i'|'chat --image') __llmkit_files "$3" ;;
        'chat --mmproj') __llmkit_files "$3" ;;
        'chat --device') __llmkit_words 'auto cpu gpu' "$3" ;;
        'caption -m'|'caption --model') __llmkit_models "$3" ;;
        'caption --mmproj') __llmkit_files "$3" ;;
        'caption --style') __llmkit_words 'short detailed alt-text tags' "$3" ;;
        'caption -f'|'caption --format') __llmkit_words 'text json jsonl' "$3" ;;
        'caption -o'|'caption --out') __llmkit_files "$3" ;;
        'caption --device') __llmkit_words 'auto cpu gpu' "$3" ;;
        'summarize -m'|'summarize --model') __llmkit_models "$3" ;;
        'summarize -l'|'summarize --length') __llmkit_words 'short medium long' "$3" ;;
        'summarize --style') __llmkit_words 'paragraph bullets tldr headline' "$3" ;;
        'summarize --as') __llmkit_words 'text markdown html pdf' "$3" ;;
        'summarize -f'|'summarize --format') __llmkit_words 'text json jsonl' "$3" ;;
        'summarize -o'|'summarize --out') __llmkit_files "$3" ;;
        'summarize --device') __llmkit_words 'auto cpu gpu' "$3" ;;
        'check -m'|'check --model') __llmkit_models "$3" ;;
        'check --file') __llmkit_files "$3" ;;
        'check --conversation') __llmkit_files "$3" ;;
        'check -i'|'check --image') __llmkit_files "$3" ;;
        'check --categories') __llmkit_files "$3" ;;
        'check -f'|'check --format') __llmkit_words 'text json' "$3" ;;
        'check --device') __llmkit_words 'auto cpu gpu' "$3" ;;
        'serve -m'|'serve --model') __llmkit_models "$3" ;;
        'serve --allow-files') __llmkit_dirs "$3" ;;
        'serve --device') __llmkit_words 'auto cpu gpu' "$3" ;;
        'list -f'|'list --format') __llmkit_words 'table json' "$3" ;;
        'show -f'|'show --format') __llmkit_words 'text json' "$3" ;;
        'show #0') __llmkit_models "$3" ;;
        'import --mmproj') __llmkit_files "$3" ;;
        'import #0') __llmkit_files "$3" ;;
        'pull -f'|'pull --format') __llmkit_words 'text json' "$3" ;;
        'pull #0') __llmkit_models "$3" ;;
        'convert -o'|'convert --output') __llmkit_files "$3" ;;
        'convert --mmproj') __llmkit_files "$3" ;;
        'convert -f'|'convert --format') __llmkit_words 'text json' "$3" ;;
        'quantize --imatrix') __llmkit_files "$3" ;;
        'quantize -f'|'quantize --format') __llmkit_words 'text json' "$3" ;;
        'quantize #0') __llmkit_files "$3" ;;
        'quantize #1') __llmkit_files "$3" ;;
        'doctor -f'|'doctor --format') __llmkit_words 'text json' "$3" ;;
        'completions #0') __llmkit_words 'bash zsh fish' "$3" ;;
    esac
}

# Puts the words that match $2 among the words $1 into COMPREPLY.
__llmkit_words() {
    local w
    for w in $(compgen -W "$1" -- "$2"); do COMPREPLY+=("$w"); done
}

__llmkit_files() {
    compopt -o filenames 2>/dev/null
    local f
    while IFS= read -r f; do COMPREPLY+=("$f"); done < <(compgen -f -- "$1")
}

__llmkit_dirs() {
    compopt -o filenames 2>/dev/null
    local f
    while IFS= read -r f; do COMPREPLY+=("$f"); done < <(compgen -d -- "$1")
}

# A model: a catalog name, or a path to a .gguf file.
__llmkit_models() {
    __llmkit_words "$__llmkit_model_names" "$1"
    compopt -o filenames 2>/dev/null
    local f
    while IFS= read -r f; do
        COMPREPLY+=("$f")
    done < <(compgen -d -- "$1"; compgen -f -X '!*.gguf' -- "$1")
}

_llmkit() {
    # bash splits words at ':' and '=' (COMP_WORDBREAKS); glue them back so that
    # `-m smollm2:135m` and `--device=cpu` are one word each. Works without bash-completion.
    local -a words=()
    local i j=-1 cword=0 glue=0 x
    for ((i = 0; i < ${#COMP_WORDS[@]} && i <= COMP_CWORD; i++)); do
        x=${COMP_WORDS[i]}
        if ((j >= 0)) && [[ -n $x ]] && { ((glue)) || [[ -z ${x//[:=]/} ]]; }; then
            words[j]+=$x
        else
            j=$((j + 1))
            words[j]=$x
        fi
        if [[ -n $x && -z ${x//[:=]/} ]]; then glue=1; else glue=0; fi
        cword=$j
    done
    local cur=${words[cword]}
    local path="" subs="" opts="" valued="" npos=0 variadic=0
    __llmkit_spec ""
    local pos=0 skip=0 dashdash=0 opt="" n
    for ((i = 1; i < cword; i++)); do
        x=${words[i]}
        if ((skip > 0)); then skip=$((skip - 1)); continue; fi
        if ((!dashdash)); then
            case $x in
                --) dashdash=1; continue ;;
                -*=*) continue ;;
                -*)
                    if [[ " $valued " == *" $x="* ]]; then
                        n=" $valued "
                        n=${n#*" $x="}
                        skip=${n%% *}
                        opt=$x
                    fi
                    continue ;;
            esac
        fi
        if ((!dashdash)) && [[ " $subs " == *" $x "* ]]; then
            path=${path:+$path }$x
            pos=0
            __llmkit_spec "$path"
        else
            pos=$((pos + 1))
        fi
    done
    local value=$cur prefix=""
    if ((skip == 0)); then
        opt=""
        if ((!dashdash)) && [[ $cur == -*=* && " $valued " == *" ${cur%%=*}="* ]]; then
            opt=${cur%%=*}
            value=${cur#*=}
            prefix=$opt=
        fi
    fi
    COMPREPLY=()
    if [[ -n $opt ]]; then
        __llmkit_value "$path" "$opt" "$value"
    elif ((!dashdash)) && [[ $cur == -* ]]; then
        __llmkit_words "$opts" "$cur"
    elif [[ -n $subs ]]; then
        __llmkit_words "$subs" "$cur"
    elif ((npos > 0)); then
        if ((pos >= npos && variadic)); then pos=$((npos - 1)); fi
        if ((pos < npos)); then __llmkit_value "$path" "#$pos" "$value"; fi
    fi
    # bash replaces only the text after the last word-break character: drop what precedes it.
    local breaks="" trim=""
    [[ $COMP_WORDBREAKS == *:* ]] && breaks+=":"
    [[ $COMP_WORDBREAKS == *=* ]] && breaks+="="
    if [[ -n $breaks && $cur == *[$breaks]* ]]; then
        trim=${cur%"${cur##*[$breaks]}"}
    fi
    if [[ -n $prefix || -n $trim ]]; then
        for i in "${!COMPREPLY[@]}"; do
            x=$prefix${COMPREPLY[i]}
            COMPREPLY[i]=${x#"$trim"}
        done
    fi
}

complete -F _llmkit llmkit
