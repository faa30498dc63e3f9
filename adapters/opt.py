"""OPT: LayerNorm, learned positions stored with an offset of 2 rows, q pre-scaled by HF
(hook_q is the q_proj output, before that scaling, as in TransformerLens), and an MLP that is
no module of its own (fc1 / fc2 inside the decoder layer, run on flattened tokens)."""
from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site
from fxhook.weights import Projection


def _for_config(hf_config) -> Adapter:
    if not getattr(hf_config, "do_layer_norm_before", True):
        raise NotImplementedError(
            "OPT with do_layer_norm_before=False (opt-350m) normalises after the residual add (post-norm); "
            "the OPT adapter (adapters/opt.py) describes pre-norm OPT only")
    if getattr(hf_config, "word_embed_proj_dim", hf_config.hidden_size) != hf_config.hidden_size:
        raise NotImplementedError(
            "OPT with word_embed_proj_dim != hidden_size projects embeddings in and out (project_in / "
            "project_out), which the OPT adapter (adapters/opt.py) does not describe")
    return OPT


OPT = Adapter(
    architectures=("OPTForCausalLM",),
    embed="model.decoder.embed_tokens",
    blocks="model.decoder.layers",
    final_norm="model.decoder.final_layer_norm",
    unembed="lm_head",
    positions=Positions("absolute", pos_embed="model.decoder.embed_positions", pos_embed_offset=2),
    norms=Norms("layernorm", ln1="self_attn_layer_norm", ln2="final_layer_norm"),
    attention=Attention(
        "self_attn",
        q_site=Site("self_attn.q_proj", split_heads=True),
        k_site=Site("self_attn.k_proj", split_heads=True),
        q_proj=Projection("self_attn.q_proj"),
        k_proj=Projection("self_attn.k_proj"),
        v_proj=Projection("self_attn.v_proj"),
        o_proj=Projection("self_attn.out_proj"),
    ),
    feed_forward=FeedForward(
        "fc2",  # the MLP's output is fc2's
        pre_site=Site("fc1"),
        post_site=Site("fc2", side="input"),
        in_proj=Projection("fc1"),
        out_proj=Projection("fc2"),
    ),
    for_config=_for_config,
)
