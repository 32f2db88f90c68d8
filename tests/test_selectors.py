"""Every selector form, its errors, and that a failing call changes nothing."""

from __future__ import annotations

import re

import pytest
import torch
from tests.conftest import encoder_layer as layer
from torch import nn

import layerfreeze as lf

ALL_NET = [f"fc{i}.{k}" for i in range(1, 6) for k in ("weight", "bias")]


class Deep(nn.Module):
    """A ModuleList of 12 layers, so that 'layer.1' and 'layer.10' both exist."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
        self.head = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 1)))


def names_under(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]


# --------------------------------------------------------------------------- names


def test_module_name_selects_its_parameters(net):
    assert lf.select(net, "fc2") == ["fc2.weight", "fc2.bias"]


def test_parameter_name_selects_only_that_parameter(net):
    assert lf.select(net, "fc2.bias") == ["fc2.bias"]


def test_dotted_module_name(cnn):
    assert lf.select(cnn, "features.1") == ["features.1.weight", "features.1.bias"]


def test_no_selector_means_every_parameter(net):
    assert lf.select(net) == ALL_NET


# --------------------------------------------------------------------------- globs


def test_star_is_exactly_one_segment():
    model = Deep()
    # '*.bias' reaches head.0.bias but not head.1.0.bias (two segments down)
    assert lf.select(model, "head.*.bias") == ["head.0.bias"]
    assert lf.select(model, "head.*") == names_under(model, "head")
    got = lf.select(model, "layer.*.weight")
    assert got == [f"layer.{i}.weight" for i in range(12)]


def test_star_inside_a_segment(net):
    assert lf.select(net, "fc*") == ALL_NET
    assert lf.select(net, "*.bias") == [f"fc{i}.bias" for i in range(1, 6)]


def test_double_star_matches_zero_or_more_segments():
    model = Deep()
    # zero segments: '**.bias' also reaches a bias at depth 2, and depth 3
    got = lf.select(model, "**.bias")
    assert got == [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert "head.1.0.bias" in got and "layer.0.bias" in got
    # '**.fc2' with zero segments is the top-level fc2
    assert lf.select(nn.ModuleDict({"fc2": nn.Linear(1, 1)}), "**.fc2") == ["fc2.weight", "fc2.bias"]


def test_double_star_in_the_middle():
    model = Deep()
    assert lf.select(model, "head.**.weight") == ["head.0.weight", "head.1.0.weight"]


# --------------------------------------------------------------------------- index and slice


def test_index_on_a_container(cnn):
    assert lf.select(cnn, "features[3]") == ["features.3.weight", "features.3.bias"]
    assert lf.select(cnn, "features[-3]") == ["features.4.weight", "features.4.bias"]


def test_slice_and_negative_slice():
    model = Deep()
    assert lf.select(model, "layer[-2:]") == names_under(model, "layer.10") + names_under(model, "layer.11")
    assert lf.select(model, "layer[0:2]") == names_under(model, "layer.0") + names_under(model, "layer.1")
    assert lf.select(model, "layer[::6]") == names_under(model, "layer.0") + names_under(model, "layer.6")
    assert lf.select(model, "layer[:-11]") == names_under(model, "layer.0")


def test_slice_counts_children_without_parameters(cnn):
    # children are indexed in registration order, parameterless ones included
    assert lf.select(cnn, "features[0:3]") == names_under(cnn, "features.0") + names_under(cnn, "features.1")


def test_index_at_the_root():
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    assert lf.select(seq, "[2]") == ["2.weight", "2.bias"]


def test_index_then_name():
    model = Deep()
    assert lf.select(model, "layer[3].bias") == ["layer.3.bias"]


# --------------------------------------------------------------------------- regex


def test_regex_is_a_full_match():
    model = Deep()
    # the finetuning-scheduler lesson: 'layer.1' must not also pick layer.10 and layer.11
    got = lf.select(model, "re:layer.1")
    assert got == ["layer.1.weight", "layer.1.bias"]
    assert not any(n.startswith(("layer.10", "layer.11")) for n in got)


def test_regex_partial_match_is_not_enough():
    model = Deep()
    with pytest.raises(lf.SelectorError, match=r"'re:aye' matches nothing") as info:
        lf.select(model, "re:aye")
    assert "layer" in info.value.suggestions  # it shows where the pattern does occur


def test_regex_on_parameter_names():
    model = Deep()
    got = lf.select(model, r"re:layer\.1\d?\.bias")
    assert got == ["layer.1.bias", "layer.10.bias", "layer.11.bias"]


# --------------------------------------------------------------------------- classes


def test_class_and_type_string_agree(cnn):
    expected = names_under(cnn, "features.1") + names_under(cnn, "features.4")
    assert lf.select(cnn, nn.BatchNorm2d) == expected
    assert lf.select(cnn, "type:BatchNorm2d") == expected
    assert lf.select(cnn, "type:torch.nn.modules.batchnorm.BatchNorm2d") == expected


def test_type_matches_subclasses(cnn):
    # BatchNorm2d derives from _BatchNorm: a base-class name picks it too
    assert lf.select(cnn, "type:_BatchNorm") == lf.select(cnn, nn.BatchNorm2d)
    assert lf.select(cnn, nn.modules.batchnorm._BatchNorm) == lf.select(cnn, nn.BatchNorm2d)


# --------------------------------------------------------------------------- callables


def test_callable_selector(net):
    seen = []

    def pick(name: str, module: nn.Module) -> bool:
        seen.append(name)
        return isinstance(module, nn.Linear) and name in ("fc3", "fc5")

    assert lf.select(net, pick) == ["fc3.weight", "fc3.bias", "fc5.weight", "fc5.bias"]
    assert {"", "fc1", "fc5"} <= set(seen)


# --------------------------------------------------------------------------- combining


def test_several_selectors_come_back_in_model_order(net):
    assert lf.select(net, "fc4", "fc2") == ["fc2.weight", "fc2.bias", "fc4.weight", "fc4.bias"]
    assert lf.select(net, ["fc4", "fc2.bias"]) == ["fc2.bias", "fc4.weight", "fc4.bias"]


def test_overlapping_selectors_give_each_name_once(net):
    assert lf.select(net, "fc2", "fc2.weight", "re:fc2\\..*") == ["fc2.weight", "fc2.bias"]


def test_exclude_one_selector(net):
    assert lf.select(net, exclude="fc2") == [n for n in ALL_NET if not n.startswith("fc2")]


def test_exclude_a_sequence(net):
    got = lf.select(net, "fc*", exclude=["fc1", "*.bias"])
    assert got == ["fc2.weight", "fc3.weight", "fc4.weight", "fc5.weight"]
    assert lf.select(net, exclude=("fc1", "fc2.bias", "re:fc[345]")) == ["fc2.weight"]


def test_exclude_with_a_class_and_callable(cnn):
    got = lf.select(cnn, "features", exclude=nn.BatchNorm2d)
    assert got == names_under(cnn, "features.0") + names_under(cnn, "features.3")
    got = lf.select(cnn, exclude=lambda n, m: n == "head")
    assert "head.weight" not in got and "features.0.weight" in got


def test_shared_parameter_once_under_its_first_name(tied_lm):
    assert tied_lm.lm_head.weight is tied_lm.embed.weight
    assert lf.select(tied_lm, "lm_head") == ["embed.weight", "lm_head.bias"]
    assert lf.select(tied_lm, "lm_head.weight") == ["embed.weight"]
    every = lf.select(tied_lm)
    assert every.count("embed.weight") == 1 and "lm_head.weight" not in every
    assert every == [n for n, _ in tied_lm.named_parameters()]


def test_excluding_an_alias_excludes_the_shared_tensor(tied_lm):
    assert "embed.weight" not in lf.select(tied_lm, exclude="lm_head.weight")


def test_wrapped_models_use_inner_names(net):
    assert lf.select(nn.DataParallel(net), "fc2") == ["fc2.weight", "fc2.bias"]


# --------------------------------------------------------------------------- errors


def test_selector_error_is_a_value_error_naming_selector_and_closest_names(net):
    with pytest.raises(ValueError, match=r"'fc22' matches nothing(.|\n)*closest names: 'fc2'") as info:
        lf.select(net, "fc22")
    err = info.value
    assert isinstance(err, lf.SelectorError) and isinstance(err, lf.LayerFreezeError)
    assert err.selector == "fc22"
    assert err.suggestions[0] == "fc2"


def test_selector_error_says_which_argument(net):
    with pytest.raises(lf.SelectorError, match=r"^selector 2 of 2: selector 'fc9' matches nothing") as info:
        lf.select(net, "fc1", "fc9")
    assert info.value.origin == "selector 2 of 2"


@pytest.mark.parametrize("selector", ["fc9", "fc[x]", "re:("])
def test_a_single_selector_error_reads_without_a_prefix(net, selector):
    with pytest.raises(lf.SelectorError) as info:
        lf.freeze(net, selector)
    message = str(info.value)
    assert info.value.origin is None
    assert not message.startswith(("argument", ":")), message
    assert repr(selector) in message.splitlines()[0]


def test_glob_error_suggests_real_names(tiny_bert):
    with pytest.raises(lf.SelectorError, match=r"closest names: .*'encoder\.layer") as info:
        lf.select(tiny_bert, "encoder.layers.*.attention")
    assert any(s.startswith("encoder.layer") for s in info.value.suggestions)


def test_type_error_suggests_present_classes(cnn):
    with pytest.raises(lf.SelectorError, match=r"closest names: 'type:BatchNorm2d'"):
        lf.select(cnn, "type:BatchNorm1d")


@pytest.mark.parametrize(
    "bad",
    [3, 1.5, torch.tensor(1.0), nn.Linear(1, 1), None, int, {"fc2": 1}],
    ids=["int", "float", "tensor", "module", "none", "non-module-class", "dict"],
)
def test_unknown_selector_form(net, bad):
    with pytest.raises(lf.SelectorTypeError, match=r"is not a|not an nn\.Module") as info:
        lf.select(net, bad)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, lf.SelectorError) and isinstance(info.value, ValueError)


def test_module_instance_error_points_to_names(net):
    with pytest.raises(lf.SelectorTypeError, match=r"Linear object is not a selector.*by its name"):
        lf.select(net, net.fc2)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("features[10]", r"index 10 is out of range for features, which has 7 children \(valid: -7\.\.6\)"),
        ("features[-8]", r"index -8 is out of range"),
        ("head[0]", r"head \(Linear\) has no child modules to index"),
        ("features[a]", r"\[a\] is neither an index"),
        ("features[::0]", r"slice step cannot be zero"),
        ("features..1", r"not a valid name pattern"),
        ("**[0]", r"'\*\*' cannot be indexed"),
        ("", r"empty selector"),
        ("type:", r"names no class"),
    ],
)
def test_malformed_selectors(cnn, selector, message):
    with pytest.raises(lf.SelectorError, match=message):
        lf.select(cnn, selector)


def test_bad_regex(net):
    with pytest.raises(lf.SelectorError, match=r"'re:fc\(2' is not a valid regular expression"):
        lf.select(net, "re:fc(2")


def test_exclude_removing_everything(net):
    with pytest.raises(lf.SelectorError, match=r"exclude= removes every parameter"):
        lf.select(net, "fc2", exclude="fc2")
    with pytest.raises(lf.SelectorError, match=r"exclude= removes every parameter"):
        lf.select(net, exclude="re:.*")


def test_exclude_matching_nothing_is_an_error(net):
    with pytest.raises(lf.SelectorError, match=r"exclude: selector 'fc7' matches nothing"):
        lf.select(net, exclude="fc7")


@pytest.mark.parametrize("fn", [lf.select, lf.freeze, lf.unfreeze, lf.count_parameters, lf.summary])
def test_non_module_model_is_a_type_error(net, fn):
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got OrderedDict; pass the model itself"):
        fn(net.state_dict())


def test_frozen_with_non_module_is_a_type_error(net):
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got list"):
        with lf.frozen(list(net.parameters())):
            pass


# --------------------------------------------------------------------------- a failing call changes nothing

BAD_CALLS = [
    ("fc1", "fc22"),  # one good selector, then a typo
    ("fc1", 7),  # an unknown form after a good one
    ("fc1", "re:(("),
    ("fc1", "fc2[0]"),
]


@pytest.mark.parametrize("selectors", BAD_CALLS, ids=["typo", "int", "regex", "index"])
def test_failing_calls_change_nothing(cnn, net, take_snapshot, selectors):
    lf.freeze(net, "fc3", mode="eval")
    lf.freeze(cnn, "features[0:2]")
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    fz = lf.Freezer(net, opt)
    before = take_snapshot(net, opt)
    for call in (
        lambda: lf.freeze(net, *selectors),
        lambda: lf.unfreeze(net, *selectors),
        lambda: lf.frozen(net, *selectors).__enter__(),
        lambda: fz.freeze(*selectors),
        lambda: fz.unfreeze(*selectors, lr=0.5),
        lambda: lf.freeze(net, "fc1", exclude=selectors[1:]),
    ):
        with pytest.raises(lf.SelectorError):
            call()
        assert take_snapshot(net, opt) == before
    fz.close()


def test_bad_mode_and_exclude_everything_change_nothing(cnn, take_snapshot):
    before = take_snapshot(cnn)
    with pytest.raises(ValueError, match=r"mode='frozen' is not one of 'norm', 'eval', 'keep'"):
        lf.freeze(cnn, "features", mode="frozen")  # type: ignore[arg-type]
    with pytest.raises(lf.SelectorError, match="removes every"):
        lf.freeze(cnn, "features.1", exclude=nn.BatchNorm2d)
    assert take_snapshot(cnn) == before


def test_regex_matching_is_cached_but_not_stateful(net):
    # the same string parsed twice gives the same answer (parsing is cached)
    assert lf.select(net, "re:fc[12]") == lf.select(net, "re:fc[12]") == names_under(net, "fc1") + names_under(
        net, "fc2"
    )
    assert re.fullmatch("fc[12]", "fc12") is None


# --------------------------------------------------------------------------- callable selectors that fail


def test_an_error_inside_a_callable_selector_is_wrapped_and_changes_nothing(net):
    def buggy(name: str, module: nn.Module) -> bool:
        return module.weight.shape[0] == 3  # the root and containers have no weight

    before = [p.requires_grad for p in net.parameters()]
    with pytest.raises(lf.SelectorError, match=r"buggy' raised AttributeError on the root module") as info:
        lf.freeze(net, "fc1", buggy)
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err.__cause__, AttributeError)  # chained from the original error
    assert err.selector is buggy
    assert [p.requires_grad for p in net.parameters()] == before  # fc1 was not frozen either


def test_a_callable_selector_error_names_the_module_it_failed_on(net):
    def picky(name: str, module: nn.Module) -> bool:
        if name == "fc3":
            raise KeyError("no table entry")
        return False

    with pytest.raises(lf.SelectorError, match=r"picky' raised KeyError on module 'fc3' \(Linear\)") as info:
        lf.select(net, picky)
    assert isinstance(info.value.__cause__, KeyError)


def test_a_callable_with_the_wrong_signature_is_a_selector_type_error(net):
    with pytest.raises(lf.SelectorTypeError, match="takes \\(name, module\\)") as info:
        lf.freeze(net, lambda name: True)
    assert isinstance(info.value, TypeError) and isinstance(info.value.__cause__, TypeError)
    assert all(p.requires_grad for p in net.parameters())


def test_a_failing_callable_in_a_schedule_names_the_rule(net):
    def broken(name: str, module: nn.Module) -> bool:
        raise RuntimeError("boom")

    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(lf.SelectorError, match=r"rule 0 \(freeze\).*broken' raised RuntimeError"):
        lf.Freezer(net, opt, lf.Schedule().freeze(broken, until_epoch=2))
    assert all(p.requires_grad for p in net.parameters())
    assert len(opt.param_groups) == 1


# --------------------------------------------------------------------------- every form on a BERT-shaped model


def test_select_every_selector_form(encoder) -> None:
    m = encoder
    assert lf.select(m, "encoder.layer.0") == layer(0)
    assert lf.select(m, "encoder.layer.0.attention.bias") == ["encoder.layer.0.attention.bias"]
    assert lf.select(m, "encoder.layer.*.attention") == [n for i in range(4) for n in layer(i) if "attention" in n]
    assert lf.select(m, "**.LayerNorm") == [n for i in range(4) for n in layer(i) if "LayerNorm" in n]
    assert lf.select(m, "encoder.layer[0:2]") == layer(0) + layer(1)
    assert lf.select(m, "encoder.layer[-2:]") == layer(2) + layer(3)
    assert lf.select(m, "encoder.layer[3]") == layer(3)
    assert lf.select(m, r"re:encoder\.layer\.[13]\.attention\.weight") == [
        "encoder.layer.1.attention.weight",
        "encoder.layer.3.attention.weight",
    ]
    assert lf.select(m, nn.BatchNorm1d) == ["norm.weight", "norm.bias"] == lf.select(m, "type:BatchNorm1d")
    assert lf.select(m, lambda name, module: name == "encoder.layer.2") == layer(2)
    # several selectors; exclude= takes one selector or a sequence
    assert lf.select(m, "encoder.layer[0]", "norm", exclude="**.bias") == [
        "encoder.layer.0.attention.weight",
        "encoder.layer.0.LayerNorm.weight",
        "norm.weight",
    ]
    assert lf.select(m, "encoder", exclude=["**.LayerNorm", "encoder.layer[1:]"]) == layer(0)[:2]
    # a shared parameter once, under its first name, in model order
    assert lf.select(m, "head") == ["embed.weight", "head.bias"]


def test_a_misspelt_module_name_is_a_value_error_naming_the_closest_module(encoder) -> None:
    m = encoder
    with pytest.raises(lf.SelectorError) as info:
        lf.freeze(m, "norm", "encoder.layr")
    err = info.value
    assert isinstance(err, ValueError)
    assert "encoder.layr" in str(err) and "'encoder.layer'" in str(err)
    assert "encoder.layer" in err.suggestions
    assert all(p.requires_grad for p in m.parameters())  # validated before changing anything


# --------------------------------------------------------------------------- typos: the trap and the fix


def test_trap_a_typo_freezes_nothing_silently(net):
    for name, p in net.named_parameters():  # what the seed does: flip requires_grad by name
        if name.count("fc22"):
            p.requires_grad = False
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 73  # nothing frozen, no error


def test_layerfreeze_rejects_a_typo_and_suggests_the_name(net):
    with pytest.raises(lf.SelectorError, match=r"'fc22' matches nothing(.|\n)*closest names: 'fc2'"):
        lf.freeze(net, "fc22")
    with pytest.raises(lf.SelectorError, match=r"'fc22'"):
        lf.Schedule().freeze("fc22", until_epoch=4).frozen_at(net, epoch=1)
    assert lf.count_parameters(net).trainable == 73


# --------------------------------------------------------------------------- empty lists and parametrized weights


def test_an_explicit_empty_list_selects_nothing(net) -> None:
    assert lf.freeze(net, []) == []
    assert all(p.requires_grad for p in net.parameters())
    assert lf.select(net, []) == []
    lf.freeze(net)
    assert lf.unfreeze(net, []) == []
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(lf.SelectorError, match="nope"):
        lf.freeze(net, [], exclude="nope")  # the exclusion is still checked


def test_the_visible_name_of_a_parametrized_weight_selects_its_originals() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    nn.utils.parametrizations.weight_norm(net[0])
    assert lf.select(net, "0.weight") == [
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
    ]
    lf.freeze(net, "0.weight")
    assert not net[0].parametrizations.weight.original1.requires_grad
    assert net[0].bias.requires_grad and net[2].weight.requires_grad


def test_the_visible_name_after_old_style_weight_norm() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(net[0])
    assert lf.select(net, "0.weight") == ["0.weight_g", "0.weight_v"]
