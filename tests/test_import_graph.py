"""The floor plan holds: no import circle, no floor importing a floor above it, and own-package
imports inside functions only where loading lazily is the module's point (tests/import_graph.py
reads the imports with ast)."""
import import_graph

# `import megatron_sparkling` stays light (Megatron-LM's patched pretrain_gpt.py imports it before
# anything else), and each CLI sub-command loads only what it runs.
LAZY_BY_DESIGN = {"megatron_sparkling", "megatron_sparkling.cli"}


def test_no_import_circle():
    assert import_graph.cycles(import_graph.own_imports()) == []


def test_no_floor_imports_a_floor_above_it():
    breaks = [f"{i.source}:{i.lineno} imports {i.target}"
              for i in import_graph.floor_breaks(import_graph.own_imports())]
    assert breaks == []


def test_the_offline_converter_knows_nothing_of_training_or_live_models():
    for name in ("core", "checkpoint"):
        assert {"training", "live"} <= set(import_graph.FORBIDDEN[name])


def test_own_imports_inside_functions_only_where_lazy_loading_is_the_point():
    inside = [f"{i.source}:{i.lineno} imports {i.target}"
              for i in import_graph.function_imports(import_graph.own_imports())
              if i.source not in LAZY_BY_DESIGN]
    assert inside == []


def test_the_graph_reader_sees_circles_and_floor_breaks():
    # the checks above are only as good as the reader: a circle and an upward import it must see
    edges = [import_graph.Import("megatron_sparkling.core.a", "megatron_sparkling.live.b", 1, False),
             import_graph.Import("megatron_sparkling.live.b", "megatron_sparkling.core.a", 2, True)]
    assert import_graph.cycles(edges) == [["megatron_sparkling.core.a", "megatron_sparkling.live.b"]]
    assert import_graph.floor_breaks(edges) == [edges[0]]
    assert import_graph.function_imports(edges) == [edges[1]]
