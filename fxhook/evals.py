"""TransformerLens's `evals`: rough, cheap evaluations of a HookedTransformer.

`from fxhook import evals` where a notebook had `from transformer_lens import evals`: the same names,
parameters and results. Differences, each said where it applies: functions whose TransformerLens default
device is "cuda" default to the model's own device (device=None), so they run on a CPU-only machine;
the data loaders and MMLU read through `datasets.load_dataset`, which works offline from the local
datasets cache, and a dataset that cannot be loaded raises an error naming it (TransformerLens skips a
missing MMLU subject with a printed warning); the MMLU functions take local datasets through the
keyword-only `dataset_by_subject`. IOIDataset with a seed draws from its own random generator (same
samples as TransformerLens's for the same seed) instead of reseeding Python's global one.
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Mapping, Optional, Union

import einops
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fxhook import utils

SANITY_CHECK_TEXT = (
    "Many important transition points in the history of science have been moments when science 'zoomed in.' "
    "At these points, we develop a visualization or tool that allows us to see the world in a new level of "
    "detail, and a new field of science develops to study the world through this lens.")


def sanity_check(model):
    """The model's loss on the first paragraph of Circuits: Zoom In. Below about 5 the model is probably
    fine; above about 7 something has gone wrong."""
    return model(SANITY_CHECK_TEXT, return_type="loss")


# --------------------------------------------------------------------------- datasets
def _load_dataset(path: str, name: Optional[str] = None, split: str = "train"):
    """`datasets.load_dataset`, offline from the local cache when HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set;
    a failure names the dataset and what to do."""
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as error:  # datasets raises many kinds (offline, not found, bad config)
        label = f"{path!r}" + (f" (config {name!r})" if name else "") + f" split {split!r}"
        raise RuntimeError(
            f"could not load the dataset {label} with datasets.load_dataset: {type(error).__name__}: {error}. "
            "Offline it must already be in the local datasets cache (load it once with network access); "
            "or build the loader from a local dataset with fxhook.utils.tokenize_and_concatenate.") from error


def _token_loader(data, tokenizer, batch_size: int, column_name: str = "text") -> DataLoader:
    """Text rows -> a shuffled DataLoader of {"tokens": [batch, 1024]} batches (TransformerLens's packing)."""
    print(len(data))
    dataset = utils.tokenize_and_concatenate(data, tokenizer, column_name=column_name)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)


def make_wiki_data_loader(tokenizer, batch_size=8):
    """WikiText-2 (train split) as token batches. Expect some leakage into most models' training data."""
    return _token_loader(_load_dataset("wikitext", "wikitext-2-v1"), tokenizer, batch_size)


def make_owt_data_loader(tokenizer, batch_size=8):
    """OpenWebText (10k documents), an open replication of GPT-2's training corpus, as token batches."""
    return _token_loader(_load_dataset("stas/openwebtext-10k"), tokenizer, batch_size)


def make_pile_data_loader(tokenizer, batch_size=8):
    """The first 10k texts of The Pile as token batches."""
    return _token_loader(_load_dataset("NeelNanda/pile-10k"), tokenizer, batch_size)


def make_code_data_loader(tokenizer, batch_size=8):
    """CodeParrot's validation set (Python code) as token batches."""
    return _token_loader(_load_dataset("codeparrot/codeparrot-valid-v2-near-dedup"), tokenizer, batch_size,
                         column_name="content")


DATASET_NAMES = ["wiki", "owt", "pile", "code"]
DATASET_LOADERS = [make_wiki_data_loader, make_owt_data_loader, make_pile_data_loader, make_code_data_loader]


# --------------------------------------------------------------------------- MMLU
MMLU_SUBJECTS = [
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
]
MMLU_ANSWER_LETTERS = ["A", "B", "C", "D"]


def make_mmlu_data_loader(
    subjects: Optional[Union[str, List[str]]] = None,
    split: str = "test",
    num_samples: Optional[int] = None,
    *,
    dataset_by_subject: Optional[Mapping[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """MMLU questions as [{"question", "choices" (4), "answer" (0-3), "subject"}], subject by subject.

    subjects: None (all 57), one name or a list of names (see MMLU_SUBJECTS); num_samples: at most this
    many per subject. Each subject is read from "cais/mmlu" with datasets.load_dataset, or, keyword-only,
    from `dataset_by_subject[subject]` (any sequence of rows with question / choices / answer, e.g. a
    datasets.Dataset), which must then hold every requested subject.
    """
    if subjects is None:
        wanted = list(MMLU_SUBJECTS)
    elif isinstance(subjects, str):
        wanted = [subjects]
    else:
        wanted = list(subjects)
    invalid = set(wanted) - set(MMLU_SUBJECTS)
    if invalid:
        raise ValueError(f"Invalid subject(s): {invalid}. Valid subjects: {', '.join(sorted(MMLU_SUBJECTS))}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 0):
        raise ValueError(f"num_samples must be None or an int >= 0; got {num_samples!r}")
    if dataset_by_subject is not None:
        missing = [s for s in wanted if s not in dataset_by_subject]
        if missing:
            raise ValueError(f"dataset_by_subject has no dataset for subject(s) {missing}: add them or ask for "
                             "fewer subjects")

    rows: List[Dict[str, Any]] = []
    for subject in wanted:
        data = dataset_by_subject[subject] if dataset_by_subject is not None else \
            _load_dataset("cais/mmlu", subject, split=split)
        count = len(data) if num_samples is None else min(num_samples, len(data))
        for index in range(count):
            example = data[index]
            rows.append({"question": example["question"], "choices": example["choices"],
                         "answer": example["answer"], "subject": subject})
    print(f"Loaded {len(rows)} MMLU examples from {len(wanted)} subject(s)")
    return rows


def _answer_letter_ids(tokenizer) -> List[int]:
    """The token of " A" ... " D" (the letter alone where the spaced form is not one token)."""
    ids = []
    for letter in MMLU_ANSWER_LETTERS:
        spaced = tokenizer.encode(" " + letter, add_special_tokens=False)
        ids.append(spaced[0] if len(spaced) == 1 else tokenizer.encode(letter, add_special_tokens=False)[0])
    return ids


def _mmlu_prompt(question: str, choices: List[str]) -> str:
    lines = [f"Question: {question}", "Choices:"]
    lines += [f"{chr(ord('A') + index)}. {choice}" for index, choice in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


@torch.inference_mode()
def mmlu_eval(
    model,
    tokenizer=None,
    subjects: Optional[Union[str, List[str]]] = None,
    split: str = "test",
    num_samples: Optional[int] = None,
    *,
    dataset_by_subject: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Zero-shot MMLU: for each question (all four choices shown), the answer letter with the highest
    log-probability after "Answer:" is the model's answer.

    Returns {"accuracy", "num_correct", "num_total", "subject_scores": {subject: accuracy}}. Data as
    make_mmlu_data_loader (dataset_by_subject: local datasets instead of "cais/mmlu").
    """
    tokenizer = tokenizer if tokenizer is not None else _model_tokenizer(model)
    questions = make_mmlu_data_loader(subjects=subjects, split=split, num_samples=num_samples,
                                      dataset_by_subject=dataset_by_subject)
    if not questions:
        raise ValueError("No MMLU data loaded. Check your subjects and num_samples parameters.")
    letter_ids = _answer_letter_ids(tokenizer)
    correct_by_subject: Dict[str, int] = {}
    total_by_subject: Dict[str, int] = {}
    for example in tqdm(questions, desc="Evaluating MMLU"):
        choices = example["choices"]
        if not 1 <= len(choices) <= len(MMLU_ANSWER_LETTERS):
            raise ValueError(f"an MMLU question must have 1 to 4 choices; got {len(choices)}")
        prompt = _mmlu_prompt(example["question"], choices)
        tokens = tokenizer.encode(prompt, return_tensors="pt").to(model.cfg.device)  # [1, pos]
        logits = model(tokens, return_type="logits")  # [1, pos, d_vocab]
        log_probs = torch.log_softmax(logits[0, -1, :], dim=-1)
        scores = [log_probs[letter_ids[index]].item() for index in range(len(choices))]
        predicted = scores.index(max(scores))
        subject = example["subject"]
        correct_by_subject[subject] = correct_by_subject.get(subject, 0) + int(predicted == example["answer"])
        total_by_subject[subject] = total_by_subject.get(subject, 0) + 1
    num_correct, num_total = sum(correct_by_subject.values()), sum(total_by_subject.values())
    return {
        "accuracy": num_correct / num_total,
        "num_correct": num_correct,
        "num_total": num_total,
        "subject_scores": {s: correct_by_subject[s] / total_by_subject[s] for s in correct_by_subject},
    }


# --------------------------------------------------------------------------- losses
def _device(model, device) -> torch.device:
    """`device`, or the model's own device when None (TransformerLens defaults to "cuda")."""
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def _model_tokenizer(model):
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("this model has no tokenizer: pass tokenizer=..., or load the model with one")
    return model.tokenizer


@torch.inference_mode()
def evaluate_on_dataset(model, data_loader, truncate=100, device=None):
    """Mean loss over the loader's batches ({"tokens": [batch, pos]}), stopping after truncate + 1
    batches (as TransformerLens). device=None: the model's device (TransformerLens's default "cuda")."""
    device = _device(model, device)
    utils.warn_if_mps(device)
    running_loss, total = 0.0, 0
    for batch in tqdm(data_loader):
        running_loss += model(batch["tokens"].to(device), return_type="loss").mean().item()
        total += 1
        if total > truncate:
            break
    if total == 0:
        raise ValueError("the data loader gave no batches: nothing to evaluate (with drop_last, the dataset "
                         "must hold at least one full batch)")
    return running_loss / total


@torch.inference_mode()
def induction_loss(model, tokenizer=None, batch_size=4, subseq_len=384, prepend_bos=None, device=None):
    """Loss on the second half of random token sequences repeated twice: low when the model has induction
    heads. Tokens are drawn with torch.randint(100, 20000) from torch's global generator, so a seed
    fixes them. prepend_bos None: model.cfg.default_prepend_bos (then the first token is replaced by BOS).
    device=None: the model's device (TransformerLens's default "cuda")."""
    device = _device(model, device)
    utils.warn_if_mps(device)
    if model.cfg.d_vocab < 20000:
        raise ValueError(f"induction_loss draws token ids from [100, 20000); this model's vocabulary has only "
                         f"{model.cfg.d_vocab} tokens")
    if 2 * subseq_len > model.cfg.n_ctx:
        raise ValueError(f"2 * subseq_len = {2 * subseq_len} tokens exceeds the model's n_ctx={model.cfg.n_ctx}: "
                         "pass a smaller subseq_len")
    first_half = torch.randint(100, 20000, (batch_size, subseq_len)).to(device)  # [batch, subseq_len]
    tokens = einops.repeat(first_half, "b p -> b (2 p)")  # [batch, 2 * subseq_len]
    if utils.override_or_use_default_value(model.cfg.default_prepend_bos, override=prepend_bos):
        tokenizer = tokenizer if tokenizer is not None else _model_tokenizer(model)
        tokens[:, 0] = tokenizer.bos_token_id
    logits = model(tokens, return_type="logits")
    per_token = utils.lm_cross_entropy_loss(logits, tokens, per_token=True)  # [batch, 2 * subseq_len - 1]
    return per_token[:, subseq_len + 1:].mean()


@torch.inference_mode()
def evaluate(model, truncate=100, batch_size=8, tokenizer=None):
    """evaluate_on_dataset over each dataset of DATASET_NAMES -> {"wiki_loss": ..., ...} (each printed)."""
    tokenizer = tokenizer if tokenizer is not None else _model_tokenizer(model)
    losses = {}
    for data_name, make_loader in zip(DATASET_NAMES, DATASET_LOADERS):
        loss = evaluate_on_dataset(model, make_loader(tokenizer=tokenizer, batch_size=batch_size), truncate=truncate)
        print(f"{data_name}: {loss}")
        losses[f"{data_name}_loss"] = loss
    return losses


# --------------------------------------------------------------------------- indirect object identification
class IOIDataset(Dataset):
    """Indirect Object Identification prompts (https://arxiv.org/pdf/2211.00593.pdf), e.g. "John and Mary
    went to the store to buy milk. Mary handed the milk to" -> " John" (IO) rather than " Mary" (S).

    Each sample: a random template, each [NOUN] placeholder filled with a random noun, [A] and [B] with two
    distinct random names. symmetric: each draw also gives the prompt with the names swapped. seed: draws
    come from random.Random(seed), the same samples TransformerLens gives for that seed; None: Python's
    global random state.
    """

    def __init__(
        self,
        tokenizer,
        templates: Optional[List[str]] = None,
        names: Optional[List[str]] = None,
        nouns: Optional[Dict[str, List[str]]] = None,
        num_samples: int = 1000,
        symmetric: bool = False,
        prepend_bos: bool = True,
        seed: Optional[int] = None,
    ):
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        self._random = random.Random(seed) if seed is not None else random
        self.templates = templates if templates is not None else self.get_default_templates()
        self.names = names if names is not None else self.get_default_names()
        self.nouns = nouns if nouns is not None else self.get_default_nouns()
        if not self.templates:
            raise ValueError("templates must hold at least one template")
        if len(set(self.names)) < 2:
            raise ValueError(f"names must hold at least two distinct names; got {self.names}")
        empty = [key for key, values in self.nouns.items() if not values]
        if empty:
            raise ValueError(f"nouns has no candidates for {empty}")
        self.samples: List[Dict[str, str]] = []
        for _ in range(num_samples // 2 if symmetric else num_samples):
            self.samples.extend(self.get_sample(symmetric=symmetric))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        sample = self.samples[idx]
        prompt = self.tokenizer.encode(sample["text"])
        if self.prepend_bos:
            prompt = [self.tokenizer.bos_token_id] + prompt
        return {
            "prompt": torch.LongTensor(prompt),
            "IO": torch.LongTensor(self.tokenizer.encode(sample["IO"])),
            "S": torch.LongTensor(self.tokenizer.encode(sample["S"])),
        }

    def get_sample(self, symmetric=False) -> List[Dict[str, str]]:
        """One draw: [{"text", "IO", "S"}] (two entries, names swapped, when symmetric)."""
        template: str = self._random.choice(self.templates)
        for noun_type, noun_list in self.nouns.items():
            template = template.replace(f"[{noun_type}]", self._random.choice(noun_list))
        first, second = self._random.sample(self.names, 2)
        orders = [(first, second), (second, first)] if symmetric else [(first, second)]
        # the answers carry a leading space: the target token is " Mary", not "Mary"
        return [{"text": template.replace("[A]", io).replace("[B]", s), "IO": " " + io, "S": " " + s}
                for io, s in orders]

    @staticmethod
    def get_default_names():
        return ["John", "Mary"]

    @staticmethod
    def get_default_templates():
        return [
            "[A] and [B] went to the [LOCATION] to buy [OBJECT]. [B] handed the [OBJECT] to [A]",
            "Then, [B] and [A] went to the [LOCATION]. [B] gave the [OBJECT] to [A]",
        ]

    @staticmethod
    def get_default_nouns():
        return {
            "LOCATION": ["store", "market"],
            "OBJECT": ["milk", "eggs", "bread"],
        }


def _collate_ioi(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    prompts = [sample["prompt"] for sample in samples]
    return {
        "prompt": torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True),  # [batch, max_pos], right-padded
        "IO": [sample["IO"] for sample in samples],
        "S": [sample["S"] for sample in samples],
        "prompt_length": [prompt.shape[0] for prompt in prompts],
    }


@torch.inference_mode()
def ioi_eval(model, dataset=None, batch_size=8, num_samples=1000, tokenizer=None, symmetric=False):
    """Mean logit difference (IO minus S, at the first token where their tokenisations differ) and accuracy
    (share of positive differences) on IOI prompts -> {"Logit Difference", "Accuracy"}.

    dataset: rows {"prompt", "IO", "S"} of token ids (None: IOIDataset(tokenizer, num_samples=num_samples,
    symmetric=symmetric)).
    """
    if dataset is None:
        tokenizer = tokenizer if tokenizer is not None else _model_tokenizer(model)
        dataset = IOIDataset(tokenizer, num_samples=num_samples, symmetric=symmetric)
    if len(dataset) == 0:
        raise ValueError("the IOI dataset is empty: nothing to evaluate")
    device = _device(model, None)
    data_loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=_collate_ioi)
    total_correct, total_logit_diff = 0, 0.0
    for batch in tqdm(data_loader):
        batch_logits = model(batch["prompt"].to(device), return_type="logits")  # [batch, pos, d_vocab]
        for i in range(batch_logits.shape[0]):
            io, s = batch["IO"][i], batch["S"][i]
            length = min(io.shape[0], s.shape[0])
            differs = torch.nonzero(io[:length] != s[:length])
            if differs.numel() == 0:
                raise ValueError(f"IO tokens {io.tolist()} and S tokens {s.tolist()} do not differ within their "
                                 "common length: the two names must tokenise differently")
            start = int(differs[0, 0])
            # the logits that predict the first differing answer token
            logits = batch_logits[i, batch["prompt_length"][i] - io.shape[0] + start - 1]
            logit_diff = logits[io[start]] - logits[s[start]]
            total_correct += int((logit_diff > 0).item())
            total_logit_diff += logit_diff.item()
    return {"Logit Difference": total_logit_diff / len(dataset), "Accuracy": total_correct / len(dataset)}
