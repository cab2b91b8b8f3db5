"""The pipelines take their options in groups, each only where it applies, with every public parameter typed."""

import dataclasses
import inspect

import pytest

from onlinemf import pipelines

GROUPS = {"params": pipelines.ModelParams, "reading": pipelines.InputOptions, "selection": pipelines.GeneSelection,
          "outputs": pipelines.OutputOptions}


@pytest.mark.parametrize(("func", "groups"), [
    (pipelines.fit, {"params", "reading", "selection", "outputs"}),
    (pipelines.update, {"reading", "outputs"}),  # the model's parameters and genes; epochs/threads as keywords
    (pipelines.project, {"reading", "outputs"}),
])
def test_each_option_group_only_where_it_applies(func, groups):
    sig = inspect.signature(func)
    assert {name for name in sig.parameters if name in GROUPS} == groups
    for name, param in sig.parameters.items():
        assert param.annotation is not inspect.Parameter.empty, f"{func.__name__}({name}) has no type hint"
        assert sig.return_annotation is not inspect.Signature.empty


def test_option_groups_share_no_field_but_the_seed():
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in GROUPS.items()}
    names = list(fields)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = fields[a] & fields[b]
            # OutputOptions.seed is post-processing's own, defaulting to the model's.
            assert shared <= {"seed"}, (a, b, shared)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        pipelines.ModelParams().k = 3
