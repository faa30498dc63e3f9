"""HookPoint's TransformerLens surface: the same calls act as on TransformerLens 3.9's HookPoint."""
from __future__ import annotations

import warnings

import pytest
import torch

from fxhook.core.hook_point import HookPoint, call_hooks, HookEntry

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformer_lens.hook_points import HookPoint as TLHookPoint


def named(cls, name):
    point = cls()
    point.name = name
    return point


def run(point, x):
    return point.run_hooks(x) if isinstance(point, HookPoint) else point(x)


def test_add_hook_by_keyword_prepend_and_aliases_act_as_in_transformer_lens():
    x = torch.arange(4.0)
    results = []
    for cls in (HookPoint, TLHookPoint):
        point = named(cls, "blocks.1.hook_resid_pre")
        seen = []
        point.add_hook(hook=lambda a, hook: seen.append(("second", hook.name)) or a * 2)
        point.add_hook(hook=lambda a, hook: seen.append(("first", hook.name)) or a + 1, prepend=True)
        point.add_hook(lambda a, hook: seen.append(("alias", hook.name, hook.layer())) or a - 3,
                       alias_names=["blocks.1.alias_a", "blocks.2.alias_b"])
        results.append((run(point, x), seen))
    (ours, our_seen), (theirs, their_seen) = results
    assert torch.equal(ours, theirs)
    assert our_seen == their_seen


def test_has_hooks_permanence_and_removal_as_in_transformer_lens():
    for cls in (HookPoint, TLHookPoint):
        point = named(cls, "hook_embed")
        assert not point.has_hooks()
        point.add_perma_hook(lambda a, hook: None)
        point.add_hook(lambda g, hook: None, dir="bwd")
        answers = [point.has_hooks(), point.has_hooks("fwd", including_permanent=False), point.has_hooks("bwd")]
        point.remove_hooks("both")
        answers += [point.has_hooks(), point.has_hooks(including_permanent=False)]
        point.remove_hooks("fwd", including_permanent=True)
        answers.append(point.has_hooks())
        if cls is HookPoint:
            ours = answers
        else:
            assert ours == answers == [True, False, True, True, False, False]


def test_call_hooks_count_in_has_hooks_only_inside_their_block():
    point = named(HookPoint, "hook_embed")
    with call_hooks([(point, "fwd", HookEntry(lambda a, hook: None))]):
        assert point.has_hooks("fwd")
    assert not point.has_hooks()


class Heads:
    """[pos, n_heads * d_head] <-> [pos, n_heads, d_head]"""

    def convert(self, x):
        return x.reshape(x.shape[0], 2, -1)

    def revert(self, x):
        return x.reshape(x.shape[0], -1)


def test_enable_reshape_shows_hooks_the_converted_tensor_both_ways():
    x = torch.randn(3, 8, requires_grad=True)
    outputs, grads, shapes = [], [], []
    for cls in (HookPoint, TLHookPoint):
        point = named(cls, "blocks.0.attn.hook_z")
        point.enable_reshape(Heads())
        seen = []

        def zero_head(a, hook):
            seen.append(tuple(a.shape))
            a = a.clone()
            a[:, 1] = 0
            return a
        point.add_hook(zero_head)
        point.add_hook(lambda g, hook: seen.append(tuple(g.shape)) or g * 2, dir="bwd")
        out = run(point, x * 1)
        out.sum().backward()
        outputs.append(out.detach())
        grads.append(x.grad.clone())
        x.grad = None
        shapes.append(seen)
    assert torch.equal(outputs[0], outputs[1])
    assert shapes[0] == shapes[1] == [(3, 2, 4), (3, 2, 4)]
    # the gradient reaches x through the edit (TransformerLens's module hooks skip it: 2 everywhere)
    expected = torch.full((3, 8), 2.0)
    expected[:, 4:] = 0
    assert torch.equal(grads[0], expected)


def test_level_and_bad_conversions_are_refused_with_the_reason():
    point = named(HookPoint, "hook_embed")
    for call in (lambda: point.add_hook(lambda a, hook: None, level=1), lambda: point.has_hooks(level=0),
                 lambda: point.remove_hooks(level=2)):
        with pytest.raises(ValueError, match="nest by themselves"):
            call()
    with pytest.raises(TypeError, match="convert\\(\\) and revert\\(\\)"):
        point.enable_reshape(object())
    with pytest.raises(ValueError, match="'fwd', 'bwd' or 'both'"):
        point.has_hooks("up")
