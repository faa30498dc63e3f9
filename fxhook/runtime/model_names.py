"""TransformerLens's official model names and aliases ("gpt2-small", "pythia-70m", "solu-1l", ...), mapped to
the checkpoints they name, so `from_pretrained` takes a TransformerLens notebook's names unchanged.

A name resolves in this order: an alias written out below; a repository listed below given by its full name
or by the part after the organisation (any case: "Qwen2-0.5B", "qwen2-0.5b"); anything else is passed on
unchanged (a local folder, another hub name). The repositories are written compactly per family.
"""
from __future__ import annotations


def _expand(org: str, pattern: str, *variants: str) -> list[str]:
    return [f"{org}/{pattern.format(v)}" if org else pattern.format(v) for v in variants]


_PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
_PYTHIA_V0_SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
_QWEN25 = ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")
_STANFORD = ("alias-gpt2-small-x21", "arwen-gpt2-medium-x21", "battlestar-gpt2-small-x49", "beren-gpt2-medium-x49",
             "caprica-gpt2-small-x81", "celebrimbor-gpt2-medium-x81", "darkmatter-gpt2-small-x343",
             "durin-gpt2-medium-x343", "eowyn-gpt2-medium-x777", "expanse-gpt2-small-x777")

REPOSITORIES: tuple[str, ...] = tuple(
    ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"]
    + _expand("EleutherAI", "pythia-{}", *_PYTHIA_SIZES)
    + _expand("EleutherAI", "pythia-{}-deduped", *_PYTHIA_SIZES[2:])
    + _expand("EleutherAI", "pythia-{}-v0", *_PYTHIA_V0_SIZES)
    + _expand("EleutherAI", "pythia-{}-deduped-v0", *_PYTHIA_V0_SIZES)
    + _expand("EleutherAI", "pythia-160m-seed{}", "1", "2", "3")
    + _expand("EleutherAI", "gpt-neo-{}", "125M", "1.3B", "2.7B") + ["EleutherAI/gpt-j-6B", "EleutherAI/gpt-neox-20b"]
    + _expand("facebook", "opt-{}", "125m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")
    + _expand("stanford-crfm", "{}", *_STANFORD)
    + _expand("roneneldan", "TinyStories-{}", "1M", "3M", "8M", "28M", "33M", "1Layer-21M", "2Layers-33M",
              "Instruct-1M", "Instruct-3M", "Instruct-8M", "Instruct-28M", "Instruct-33M", "Instruct-2Layers-33M",
              "Instuct-1Layer-21M")
    + _expand("NeelNanda", "{}", "Attn-Only-2L512W-Shortformer-6B-big-lr",
              *(f"Attn_Only_{n}L512W_C4_Code" for n in range(1, 5)), *(f"GELU_{n}L512W_C4_Code" for n in range(1, 5)),
              "SoLU_1L512W_C4_Code", "SoLU_2L512W_C4_Code", "SoLU_3L512W_C4_Code", "SoLU_4L512W_C4_Code",
              "SoLU_6L768W_C4_Code", "SoLU_8L1024W_C4_Code", "SoLU_10L1280W_C4_Code", "SoLU_12L1536W_C4_Code",
              "SoLU_1L512W_Wiki_Finetune", "SoLU_4L512W_Wiki_Finetune", "SoLU_1L_v9_old", "SoLU_2L_v10_old",
              "SoLU_4L_v11_old", "SoLU_6L_v13_old", "SoLU_8L_v21_old", "SoLU_10L_v22_old", "SoLU_12L_v23_old")
    + _expand("meta-llama", "Llama-2-{}", "7b-hf", "7b-chat-hf", "13b-hf", "13b-chat-hf", "70b-chat-hf")
    + _expand("meta-llama", "{}", "Meta-Llama-3-8B", "Meta-Llama-3-8B-Instruct", "Meta-Llama-3-70B",
              "Meta-Llama-3-70B-Instruct", "Llama-3.1-8B", "Llama-3.1-8B-Instruct", "Llama-3.1-70B",
              "Llama-3.1-70B-Instruct", "Llama-3.2-1B", "Llama-3.2-1B-Instruct", "Llama-3.2-3B",
              "Llama-3.2-3B-Instruct", "Llama-3.3-70B-Instruct")
    + _expand("codellama", "CodeLlama-7b-{}", "hf", "Instruct-hf", "Python-hf")
    + _expand("mistralai", "{}", "Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.1", "Mixtral-8x7B-v0.1",
              "Mixtral-8x7B-Instruct-v0.1", "Mistral-Nemo-Base-2407", "Mistral-Small-24B-Base-2501")
    + _expand("google", "gemma-{}", "2b", "2b-it", "7b", "7b-it", "2-2b", "2-2b-it", "2-9b", "2-9b-it", "2-27b",
              "2-27b-it", "3-270m", "3-270m-it", "3-1b-pt", "3-1b-it")
    + _expand("Qwen", "Qwen2-{}", "0.5B", "0.5B-Instruct", "1.5B", "1.5B-Instruct", "7B", "7B-Instruct")
    + _expand("Qwen", "Qwen2.5-{}", *_QWEN25) + _expand("Qwen", "Qwen2.5-{}-Instruct", *_QWEN25)
    + _expand("Qwen", "Qwen1.5-{}", "0.5B", "0.5B-Chat", "1.8B", "1.8B-Chat", "4B", "4B-Chat", "7B", "7B-Chat",
              "14B", "14B-Chat")
    + _expand("Qwen", "Qwen3-{}", "0.6B", "0.6B-Base", "1.7B", "4B", "8B", "14B")
    + _expand("microsoft", "{}", "phi-1", "phi-1_5", "phi-2", "Phi-3-mini-4k-instruct", "phi-4")
    + _expand("allenai", "{}", "OLMo-1B-hf", "OLMo-7B-hf", "OLMo-2-0425-1B", "OLMo-2-1124-7B", "OLMoE-1B-7B-0924")
    + _expand("01-ai", "Yi-{}", "6B", "6B-Chat", "34B", "34B-Chat")
    + _expand("bigscience", "bloom-{}", "560m", "1b1", "1b7", "3b", "7b1")
    + _expand("stabilityai", "stablelm-{}", "base-alpha-3b", "base-alpha-7b", "tuned-alpha-3b", "tuned-alpha-7b")
    + ["bigcode/santacoder", "ai-forever/mGPT", "openai/gpt-oss-20b", "Qwen/QwQ-32B-Preview"]
)

# aliases that are not a repository's own name
_TOY = {"attn-only": "NeelNanda/Attn_Only_{}L512W_C4_Code", "gelu": "NeelNanda/GELU_{}L512W_C4_Code"}
_SOLU_WIDTH = {1: 512, 2: 512, 3: 512, 4: 512, 6: 768, 8: 1024, 10: 1280, 12: 1536}
_SOLU_OLD = {1: 9, 2: 10, 4: 11, 6: 13, 8: 21, 10: 22, 12: 23}
_OLD_PYTHIA = {"70m": "19m", "160m": "125m", "410m": "350m", "1b": "800m", "1.4b": "1.3b", "2.8b": "2.7b",
               "6.9b": "6.7b", "12b": "13b"}


def _aliases() -> dict[str, str]:
    table = {"gpt2-small": "gpt2", "distillgpt2": "distilgpt2", "distill-gpt2": "distilgpt2",
             "distil-gpt2": "distilgpt2", "gpt2-xs": "distilgpt2",
             "gpt-neo": "EleutherAI/gpt-neo-125M", "gpt-neo-small": "EleutherAI/gpt-neo-125M",
             "neo-small": "EleutherAI/gpt-neo-125M", "neo": "EleutherAI/gpt-neo-125M",
             "gpt-neo-medium": "EleutherAI/gpt-neo-1.3B", "neo-medium": "EleutherAI/gpt-neo-1.3B",
             "gpt-neo-large": "EleutherAI/gpt-neo-2.7B", "neo-large": "EleutherAI/gpt-neo-2.7B",
             "gpt-j": "EleutherAI/gpt-j-6B", "gptj": "EleutherAI/gpt-j-6B", "gpt-neox": "EleutherAI/gpt-neox-20b",
             "neox": "EleutherAI/gpt-neox-20b", "pythia": "EleutherAI/pythia-70m", "pythia-v0": "EleutherAI/pythia-70m-v0",
             "opt": "facebook/opt-125m", "opt-small": "facebook/opt-125m", "opt-medium": "facebook/opt-1.3b",
             "opt-large": "facebook/opt-2.7b", "opt-xl": "facebook/opt-6.7b", "opt-xxl": "facebook/opt-13b",
             "opt-xxxl": "facebook/opt-30b", "opt-xxxxl": "facebook/opt-66b",
             "attn-only-2l-demo": "NeelNanda/Attn-Only-2L512W-Shortformer-6B-big-lr",
             "attn-only-2l-shortformer-6b-big-lr": "NeelNanda/Attn-Only-2L512W-Shortformer-6B-big-lr",
             "attn-only-2l-induction-demo": "NeelNanda/Attn-Only-2L512W-Shortformer-6B-big-lr",
             "attn-only-demo": "NeelNanda/Attn-Only-2L512W-Shortformer-6B-big-lr",
             "mistral-7b": "mistralai/Mistral-7B-v0.1", "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.1",
             "mixtral": "mistralai/Mixtral-8x7B-v0.1", "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
             "mixtral-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
             "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
             "phi-3": "microsoft/Phi-3-mini-4k-instruct", "gpt-oss": "openai/gpt-oss-20b",
             "olmo-1b": "allenai/OLMo-1B-hf", "olmo-7b": "allenai/OLMo-7B-hf", "olmo-2-1b": "allenai/OLMo-2-0425-1B",
             "olmo-2-7b": "allenai/OLMo-2-1124-7B", "olmoe": "allenai/OLMoE-1B-7B-0924",
             "qwen-32b-preview": "Qwen/QwQ-32B-Preview"}
    for size, old in _OLD_PYTHIA.items():
        for suffix in ("", "-deduped", "-v0", "-deduped-v0"):
            table[f"pythia-{old}{suffix}"] = table[f"EleutherAI/pythia-{old}{suffix}"] = \
                f"EleutherAI/pythia-{size}{suffix}"
    for seed in "123":
        table[f"pythia-125m-seed{seed}"] = table[f"EleutherAI/pythia-125m-seed{seed}"] = \
            f"EleutherAI/pythia-160m-seed{seed}"
    for kind, repo in _TOY.items():
        for n in range(1, 5):
            for suffix in ("", "-new", "-c4-code"):
                table[f"{kind}-{n}l{suffix}"] = repo.format(n)
    for n, width in _SOLU_WIDTH.items():
        for suffix in ("", "-new", "-c4-code"):
            table[f"solu-{n}l{suffix}"] = f"NeelNanda/SoLU_{n}L{width}W_C4_Code"
    for n, version in _SOLU_OLD.items():
        table[f"solu-{n}l-pile"] = table[f"solu-{n}l-old"] = f"NeelNanda/SoLU_{n}L_v{version}_old"
    for n in (1, 4):
        for suffix in ("wiki", "wiki-finetune", "finetune"):
            table[f"solu-{n}l-{suffix}"] = f"NeelNanda/SoLU_{n}L512W_Wiki_Finetune"
    for repo in _STANFORD:
        size = repo.split("-")[2]  # "small" / "medium"
        letter = "abcde"[("x21", "x49", "x81", "x343", "x777").index(repo.rsplit("-", 1)[1])]
        table[f"stanford-gpt2-{size}-{letter}"] = f"stanford-crfm/{repo}"
        table[f"gpt2-stanford-{size}-{letter}"] = f"stanford-crfm/{repo}"
        # TransformerLens's historical spellings: "mistral" (the training framework) and "medium-small"
        table[f"gpt2-mistral-small-{letter}" if size == "small" else f"gpt2-medium-small-{letter}"] = \
            f"stanford-crfm/{repo}"
    for repo in (r for r in REPOSITORIES if r.startswith("roneneldan/")):
        tail = repo.split("/")[1].removeprefix("TinyStories-").replace("Instuct", "Instruct")
        tail = tail.replace("1Layer", "1L").replace("2Layers", "2L")
        table["tiny-stories-" + (tail.replace("Instruct-", "instruct-"))] = repo
    for size, repo in (("7b", "7b-hf"), ("13b", "13b-hf")):
        table[f"Llama-2-{size}"] = f"meta-llama/Llama-2-{repo}"
    for size in ("7b", "13b", "70b"):
        table[f"Llama-2-{size}-chat"] = f"meta-llama/Llama-2-{size}-chat-hf"
    table["CodeLlama-7b-instruct"] = "codellama/CodeLlama-7b-Instruct-hf"
    table["CodeLlamallama-2-7b"] = "codellama/CodeLlama-7b-hf"  # sic: TransformerLens's alias
    table["meta-llama-2-70b-chat-hf"] = "meta-llama/Llama-2-70b-chat-hf"
    table["CodeLlama-7b-python"] = "codellama/CodeLlama-7b-Python-hf"
    for variant in ("base", "tuned"):
        for size in ("3b", "7b"):
            table[f"stablelm-{variant}-{size}"] = f"stabilityai/stablelm-{variant}-alpha-{size}"
    return table


ALIASES: dict[str, str] = _aliases()
_BY_TAIL = {repo.split("/")[-1].lower(): repo for repo in REPOSITORIES}
_BY_NAME = {repo.lower(): repo for repo in REPOSITORIES}


def official_repository(name: str) -> str | None:
    """The checkpoint a TransformerLens official name or alias names, or None when it is not one."""
    if name in ALIASES:
        return ALIASES[name]
    lowered = name.lower()
    return _BY_NAME.get(lowered) or _BY_TAIL.get(lowered)


def is_transformer_lens_native(repository: str) -> bool:
    """Checkpoints saved by TransformerLens itself (its own state dict layout, not a HF model)."""
    return repository.startswith(("NeelNanda/", "ArthurConmy/", "Baidicoot/"))
